"""Which config, params, forward and checkpoint layout belong to each transformers `model_type`."""

import dataclasses
import types
from collections.abc import Callable

from t5x_lite import config as config_lib
from t5x_lite.convert import t5_layout
from t5x_lite.errors import ConversionError
from t5x_lite.models import t5


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  model_types: tuple[str, ...]
  config_class: type
  config_from_hf: Callable  # (hf dict, tensor names, source=) -> config
  config_to_hf: Callable  # config -> hf dict
  model: types.ModuleType  # param_specs(config), forward(params, config, ...)
  layout: Callable  # config -> list[Rule]
  ignored: Callable  # config -> tensor names to skip on import


FAMILIES = {
    "t5": Family("t5", config_lib.T5_MODEL_TYPES, config_lib.T5Config, config_lib.t5_config_from_hf,
                 config_lib.t5_config_to_hf, t5, t5_layout.layout, t5_layout.ignored),
}


def family_of_model_type(model_type: str | None, source: str) -> Family:
  for family in FAMILIES.values():
    if model_type in family.model_types:
      return family
  supported = sorted(t for f in FAMILIES.values() for t in f.model_types)
  raise ConversionError(f"{source}: model_type {model_type!r} is not supported (supported: {supported})")


def family_of_config(config) -> Family:
  return FAMILIES[config.family]
