"""The registry of model families: one `Family` entry each (family.py says what the hooks must do).

A new family joins with its own modules, one entry here, its converter layout (convert/<name>_layout.py) and
a tiny config in tests/test_family_conformance.py, whose checks it must pass.
"""

from t5x_lite import config as config_lib
from t5x_lite.errors import ConversionError
from t5x_lite.models import gemma, gemma_decode, t5, t5gemma2
from t5x_lite.models.family import Family

T5 = Family(
    name="t5", config_class=config_lib.T5Config, model_types=config_lib.T5_MODEL_TYPES,
    config_from_hf=config_lib.t5_config_from_hf, config_to_hf=config_lib.t5_config_to_hf,
    layout_module="t5x_lite.convert.t5_layout", tokenizer="t5",
    param_specs=t5.param_specs, forward=t5.forward, encode=t5.encode, decoder=t5.decoder,
    batch_logits=t5.batch_logits, forward_flops_per_token=t5.forward_flops_per_token,
    activation_stacks=t5.activation_stacks, check_inputs=t5.check_inputs, slot_decoder=t5.slot_decoder)

GEMMA = Family(
    name="gemma", config_class=config_lib.GemmaConfig, model_types=config_lib.GEMMA_MODEL_TYPES,
    config_from_hf=config_lib.gemma_config_from_hf, config_to_hf=config_lib.gemma_config_to_hf,
    layout_module="t5x_lite.convert.gemma_layout", tokenizer="gemma",
    param_specs=gemma.param_specs, forward=gemma.forward, decoder=gemma_decode.decoder,
    batch_logits=gemma.batch_logits, forward_flops_per_token=gemma.forward_flops_per_token,
    activation_stacks=gemma.activation_stacks, slot_decoder=gemma_decode.slot_decoder)

T5GEMMA2 = Family(
    name="t5gemma2", config_class=config_lib.T5Gemma2Config, model_types=config_lib.T5GEMMA2_MODEL_TYPES,
    config_from_hf=config_lib.t5gemma2_config_from_hf, config_to_hf=config_lib.t5gemma2_config_to_hf,
    layout_module="t5x_lite.convert.t5gemma2_layout", tokenizer="gemma",
    param_specs=t5gemma2.param_specs, forward=t5gemma2.forward, encode=t5gemma2.encode, decoder=t5gemma2.decoder,
    batch_logits=t5gemma2.batch_logits, forward_flops_per_token=t5gemma2.forward_flops_per_token,
    activation_stacks=t5gemma2.activation_stacks, image_rows=t5gemma2.image_rows,
    slot_decoder=t5gemma2.slot_decoder)

FAMILIES = {family.name: family for family in (T5, GEMMA, T5GEMMA2)}


def family_of_config(config) -> Family:
  """The family of a config (its class's `family` name); ValueError for one no entry registers."""
  name = getattr(config, "family", None)
  if name not in FAMILIES:
    raise ValueError(f"no model family {name!r} is registered (registered: {sorted(FAMILIES)}); "
                     f"{type(config).__name__} is not a model config of t5x_lite")
  return FAMILIES[name]


def family_of_model_type(model_type: str | None, source: str) -> Family:
  """The family that reads transformers' `model_type`; ConversionError naming `source` for an unsupported one."""
  for family in FAMILIES.values():
    if model_type in family.model_types:
      return family
  supported = sorted(t for f in FAMILIES.values() for t in f.model_types)
  raise ConversionError(f"{source}: model_type {model_type!r} is not supported (supported: {supported})")
