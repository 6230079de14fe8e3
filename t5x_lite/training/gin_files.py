"""Where gin files are found: as given (from the working directory), else among the project's own configs.

The configs live at the repository's top level (`configs/`) and travel inside the installed package as
`t5x_lite.configs`; either way `CONFIG_ROOT` is the folder that holds `configs/`, so `configs/runs/demo.gin` and
the `include 'configs/models/...'` lines inside our files resolve from any working directory.
"""

import os

import t5x_lite.configs

CONFIG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(t5x_lite.configs.__file__)))


def resolve(path: str) -> str:
  """The absolute path of gin file `path`: relative to the working directory if it is there, else to CONFIG_ROOT.
  FileNotFoundError names both places when it is in neither."""
  for candidate in (path, os.path.join(CONFIG_ROOT, path)):
    if os.path.isfile(candidate):
      return os.path.abspath(candidate)
  here = os.path.abspath(path) == os.path.abspath(os.path.join(CONFIG_ROOT, path))
  where = os.getcwd() if here else f"{os.getcwd()} and {CONFIG_ROOT}"
  raise FileNotFoundError(f"gin file {path!r} not found (looked in {where})")


def parse(files: list[str], bindings: list[str]) -> None:
  """Parses the gin files, then the `NAME = VALUE` bindings, and finalises the config.

  Raises FileNotFoundError for a gin file found nowhere, and ValueError for a binding of a macro that no gin file
  defines: gin would accept `--gin.TRAIN_STEPZ=3` as a new macro nobody reads and run the default number of steps.
  """
  import gin  # pylint: disable=import-outside-toplevel
  gin.add_config_file_search_path(CONFIG_ROOT)  # for the includes inside the files
  gin.parse_config_files_and_bindings([resolve(f) for f in files], None, finalize_config=False)
  for binding in bindings:
    name = binding.split("=", 1)[0].strip()
    if "." not in name and "/" not in name:  # a macro (parameters are checked by gin against configurables)
      try:
        gin.query_parameter(f"%{name}")
      except ValueError:
        raise ValueError(f"--gin.{name}: no gin file defines the macro {name}; a misspelling? (bind parameters "
                         "as Configurable.parameter)") from None
  gin.parse_config_files_and_bindings(None, bindings)
