"""Where gin files are found (as given, from the working directory, else among the project's own configs), and
parsing them with bindings so that every mistake names its file and line or its flag (gin_bindings.py).

The configs live at the repository's top level (`configs/`) and travel inside the installed package as
`t5x_lite.configs`; either way `CONFIG_ROOT` is the folder that holds `configs/`, so `configs/runs/demo.gin` and
the `include 'configs/models/...'` lines inside our files resolve from any working directory.
"""

import logging
import os

from gin import config_parser

import t5x_lite.configs
from t5x_lite.training.gin_bindings import GinConfigError, check_macros, check_types, located, origins, statements

CONFIG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(t5x_lite.configs.__file__)))


def split_gin_flags(argv) -> tuple[list[str], list[str]]:
  """(gin bindings "NAME = VALUE" of the `--gin.NAME=VALUE` flags, the other arguments), for the command lines of
  train.py, inspect and sweep, which all take gin bindings as flags."""
  bindings, rest = [], []
  for arg in argv:
    if arg.startswith("--gin.") and "=" in arg:
      name, value = arg[len("--gin."):].split("=", 1)
      bindings.append(f"{name} = {value}")
    else:
      rest.append(arg)
  return bindings, rest


def resolve(path: str) -> str:
  """The absolute path of gin file `path`: relative to the working directory if it is there, else to CONFIG_ROOT.
  FileNotFoundError names both places when it is in neither."""
  for candidate in (path, os.path.join(CONFIG_ROOT, path)):
    if os.path.isfile(candidate):
      return os.path.abspath(candidate)
  here = os.path.abspath(path) == os.path.abspath(os.path.join(CONFIG_ROOT, path))
  where = os.getcwd() if here else f"{os.getcwd()} and {CONFIG_ROOT}"
  raise FileNotFoundError(f"gin file {path!r} not found (looked in {where})")


def include_path(name: str) -> str:
  """The file gin reads for `include 'name'`, found as gin finds it: for each of its search paths (the working
  directory, then CONFIG_ROOT), the file itself, else a package on sys.path (gin's system-path reader)."""
  from gin import resource_reader  # pylint: disable=import-outside-toplevel
  for prefix in ([""] if os.path.isabs(name) else ["", CONFIG_ROOT]):
    candidate = os.path.join(prefix, name)
    if os.path.isfile(candidate):
      return os.path.abspath(candidate)
    logging.disable(logging.ERROR)  # its "Path not found" lines (gin printed them already, looking for the file)
    try:
      if resource_reader.system_path_file_exists(candidate):
        with resource_reader.system_path_reader(candidate) as f:
          return os.path.abspath(f.name)
    finally:
      logging.disable(logging.NOTSET)
  raise FileNotFoundError(f"gin file {name!r} not found")  # gin, which read the same file, found it


def files_read(files: list[str]) -> list[str]:
  """The paths of every gin file that `files` read, each once: the files given, then their includes."""
  paths = [resolve(f) for f in files]
  out = dict.fromkeys(paths)
  for _, statement in statements(paths, include_path):
    if isinstance(statement, config_parser.IncludeStatement):
      out.setdefault(include_path(statement.filename))
  return list(out)


def flag_of(binding: str) -> str:
  """The command-line flag that gives `binding` ("NAME = VALUE" -> "--gin.NAME=VALUE")."""
  name, value = binding.split("=", 1)
  return f"--gin.{name.strip()}={value.strip()}"


def parse(files: list[str], bindings: list[str], flags: list[str] | None = None) -> None:
  """Parses the gin files, then the `NAME = VALUE` bindings (given by `flags`, `--gin.NAME=VALUE` by default),
  checks them and finalises the config.

  Raises FileNotFoundError for a gin file found nowhere, and GinConfigError (a ValueError) starting with the
  file and line, or the flag, of: a binding of a configurable or parameter that does not exist, a value of the
  wrong type, a macro read but never defined, a `--gin.MACRO` that no gin file defines (gin would accept
  `--gin.TRAIN_STEPZ=3` as a new macro nobody reads and run the default number of steps), a syntax error.
  """
  import gin  # pylint: disable=import-outside-toplevel
  flags = flags or [flag_of(b) for b in bindings]
  gin.add_config_file_search_path(CONFIG_ROOT)  # for the includes inside the files
  paths = [resolve(f) for f in files]
  for path in paths:
    try:
      gin.parse_config_file(path)
    except (ValueError, KeyError, TypeError, SyntaxError) as e:
      raise GinConfigError(located(e)) from None
  for binding, flag in zip(bindings, flags):
    name = binding.split("=", 1)[0].strip()
    if "." not in name and "/" not in name:  # a macro (parameters are checked by gin against configurables)
      try:
        gin.query_parameter(f"%{name}")
      except ValueError:
        raise GinConfigError(f"{flag}: no gin file defines the macro {name}; a misspelling? (bind parameters as "
                             "Configurable.parameter)") from None
    try:
      gin.parse_config(binding)
    except (ValueError, KeyError, TypeError, SyntaxError) as e:
      raise GinConfigError(located(e, flag)) from None
  where = origins(paths, bindings, flags, include_path)
  check_macros(where)
  check_types(where)
  gin.finalize()
