"""A sweep's trials, checked before any of them runs: each point's full configuration (the gin files, the base
bindings, the point's bindings) is parsed here as train.py will parse it, so a grid over a name no config
defines, a misspelled configurable or a value of the wrong type stops the sweep with the flag, variants line or
FILE:LINE that made it (t5x_lite.training.gin_files), before anything is written.
"""

import os
import sys
import typing

import t5x_lite
from t5x_lite.sweep import space
from t5x_lite.sweep.results import trial_dir


class Trial(typing.NamedTuple):
  key: str
  point: space.Point
  train_steps: int
  command: list[str]  # train.py and its flags; an executor adds the distributed flags


def default_train_py() -> str:
  """The repository's train.py, beside the package (a checkout or an editable install)."""
  return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(t5x_lite.__file__))), "train.py")


def plan(sweep_dir: str, gin_files: list[str], base_bindings: list[str], points: list[space.Point],
         train_py: str | None = None) -> list[Trial]:
  """The trials of `points`, each with its key, its train_steps and its train.py command. Raises
  FileNotFoundError / ValueError (GinConfigError, SpaceError) naming the place of the first mistake."""
  import importlib  # pylint: disable=import-outside-toplevel
  import gin  # pylint: disable=import-outside-toplevel
  for module in ("t5x_lite.config", "t5x_lite.training.run"):  # what registers train.py's configurables
    importlib.import_module(module)
  from t5x_lite.training import gin_files as gin_files_lib  # pylint: disable=import-outside-toplevel
  from t5x_lite.training.gin_bindings import value_of  # pylint: disable=import-outside-toplevel
  train_py = train_py or default_train_py()
  if not os.path.isfile(train_py):
    raise FileNotFoundError(f"{train_py} not found: give --sweep.train_py=PATH (train.py of the repository)")
  paths = [gin_files_lib.resolve(f) for f in gin_files]
  base = space.base_fingerprint(gin_files_lib.files_read(gin_files), base_bindings)
  base_flags = [gin_files_lib.flag_of(b) for b in base_bindings]
  trials = []
  try:
    for point in points:
      gin.clear_config()
      gin_files_lib.parse(paths, base_bindings + point.gin_bindings(),
                          base_flags + [point.places[name] for name in point.bindings])
      key = space.trial_key(base, point)
      command = [sys.executable, os.path.abspath(train_py), *(f"--gin_file={p}" for p in paths),
                 f"--workdir={trial_dir(sweep_dir, key)}", *base_flags, *point.flags()]
      trials.append(Trial(key, point, int(value_of("train.train_steps")), command))
  finally:
    gin.clear_config()
  return trials
