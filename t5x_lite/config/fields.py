"""Type checks for the fields of a config dataclass.

A config field with a wrong type (`"d_model": "abc"` in config.json, `--gin.T5Config.d_model='"big"'`) would
otherwise fail deep inside a traced function with a message about `**` or einsum shapes; checked here, the error
names the field and the value where they enter.
"""

import dataclasses
import functools
import inspect
import numbers
import types
import typing

from t5x_lite.errors import ConversionError


def check_field_types(config) -> None:
  """Raises ValueError naming the first field of `config` whose value does not have its annotated type.

  int fields take integers (not bools), float fields any real number (not bools), `X | None` also None, and
  tuple fields a tuple; other annotations are not checked. A list given to a tuple field (JSON and gin have no
  tuples) is stored as a tuple, in place: a config must stay hashable, as a static jit argument.
  """
  hints = typing.get_type_hints(type(config))
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    if isinstance(value, list) and _matches((), hints[field.name]):
      value = tuple(value)
      object.__setattr__(config, field.name, value)  # frozen dataclass: its own __post_init__ may set fields
    check_value(f"{type(config).__name__}.{field.name}", value, hints[field.name])


def check_arguments(name: str, arguments: dict, fn) -> None:
  """`check_value` for each of `arguments` that `fn` annotates; `name` prefixes them (gin's `name.argument`)."""
  hints = typing.get_type_hints(fn)
  for arg, value in arguments.items():
    if arg in hints:
      check_value(f"{name}.{arg}", value, hints[arg])


def checked_arguments(fn):
  """Decorator: every call checks `fn`'s annotated arguments (`check_arguments` under `fn`'s name), e.g. for a
  gin-configurable function where `--gin.rsqrt_schedule.base_learning_rate='"1.0"'` would otherwise fail in jit."""
  signature = inspect.signature(fn)

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    check_arguments(fn.__name__, bound.arguments, fn)
    return fn(*args, **kwargs)
  return wrapper


def check_value(name: str, value, hint) -> None:
  """ValueError naming `name` when `value` does not have the annotated type `hint`."""
  if not _matches(value, hint):
    raise ValueError(f"{name} must be {_describe(hint)}, got {value!r} ({type(value).__name__})")


def _matches(value, hint) -> bool:
  if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
    return any(_matches(value, h) for h in typing.get_args(hint))
  if hint is type(None):
    return value is None
  if hint is bool:
    return isinstance(value, bool)
  if hint is int:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
  if hint is float:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
  if hint is str:
    return isinstance(value, str)
  if typing.get_origin(hint) is tuple:
    return isinstance(value, tuple)
  return True


def _describe(hint) -> str:
  if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
    return " or ".join(_describe(h) for h in typing.get_args(hint))
  if hint is type(None):
    return "None"
  if typing.get_origin(hint) is tuple:
    return "a tuple"
  return {bool: "a bool (true/false)", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def labels_and_extras(hf: dict, owned: set[str]) -> tuple[int, dict]:
  """(num_labels, the keys of a transformers config dict not in `owned`, its label maps included): what a config
  keeps in hf_extra_json to write back on export."""
  num_labels = len(hf["id2label"]) if "id2label" in hf else hf.get("num_labels", 2)
  extra = {k: v for k, v in hf.items() if k not in owned}
  if "id2label" in hf:
    extra["id2label"], extra["label2id"] = hf["id2label"], hf.get("label2id")
  return num_labels, extra


def build_config(cls, source: str, **fields):
  """`cls(**fields)` for a config read from `source` (a config.json path): a bad value raises ConversionError
  naming the file."""
  try:
    return cls(**fields)
  except ValueError as e:
    # gin appends "In call to configurable ..." on a second line; the file is the context here.
    raise ConversionError(f"{source}: {str(e).splitlines()[0]}") from None
