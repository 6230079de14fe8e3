"""Which config, params, forward and checkpoint layout belong to each transformers `model_type`."""

import dataclasses
import types
from collections.abc import Callable

from t5x_lite import config as config_lib
from t5x_lite.convert import gemma_layout, t5_layout
from t5x_lite.errors import ConversionError
from t5x_lite.models import gemma, t5


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
  ignored_prefixes: Callable = lambda config: ()  # config -> name prefixes to skip on import
  export_config: Callable = lambda config: config  # config as written back to transformers
  aliases: Callable = lambda name: ()  # HF name -> other names the same tensor may have in a file
  copies: Callable = lambda config: {}  # config -> {HF name: layout HF name it must equal, if present}


FAMILIES = {
    "t5": Family("t5", config_lib.T5_MODEL_TYPES, config_lib.T5Config, config_lib.t5_config_from_hf,
                 config_lib.t5_config_to_hf, t5, t5_layout.layout, t5_layout.ignored,
                 copies=t5_layout.copies),
    "gemma": Family("gemma", config_lib.GEMMA_MODEL_TYPES, config_lib.GemmaConfig, config_lib.gemma_config_from_hf,
                    config_lib.gemma_config_to_hf, gemma, gemma_layout.layout, gemma_layout.ignored,
                    gemma_layout.ignored_prefixes, gemma_layout.export_config, gemma_layout.aliases),
}


def family_of_model_type(model_type: str | None, source: str) -> Family:
  for family in FAMILIES.values():
    if model_type in family.model_types:
      return family
  supported = sorted(t for f in FAMILIES.values() for t in f.model_types)
  raise ConversionError(f"{source}: model_type {model_type!r} is not supported (supported: {supported})")


def family_of_config(config) -> Family:
  return FAMILIES[config.family]
