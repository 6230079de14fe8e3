"""t5x_lite: T5 and Gemma families in JAX, numerically matching transformers.

Public contract (see README): `load`, `Model`, `ConversionError`, `ImageError`, `make_mesh`, and `t5x_lite.data`.

The names load on first use (PEP 562 module `__getattr__`): the entry points import small modules of this package
(`xla_flags`, `malloc_tunables`) that must run before JAX is imported, and `malloc_tunables` may re-execute the
process, so importing the package itself must not pull in JAX (1.3 s).
"""

import importlib
import importlib.util

_EXPORTS = {"ConversionError": "t5x_lite.errors", "ImageError": "t5x_lite.errors", "Model": "t5x_lite.model",
            "load": "t5x_lite.model", "make_mesh": "t5x_lite.sharding"}
__all__ = list(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
  elif importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a subpackage, e.g. t5x_lite.data
    value = importlib.import_module(f"{__name__}.{name}")
  else:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  globals()[name] = value
  return value
