"""SigLIP vision tower config (T5Gemma 2's image encoder), from and to transformers' `SiglipVisionConfig` dict."""

import dataclasses
import json
from typing import Any

import gin

from t5x_lite.config.fields import build_config, check_field_types
from t5x_lite.errors import ConversionError

# transformers' SiglipVisionConfig keys we interpret; the others ride along in hf_extra_json.
_OWNED_KEYS = {"model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_channels", "image_size", "patch_size", "hidden_act", "layer_norm_eps", "vision_use_head"}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig:
  """The vision transformer: (image_size / patch_size)**2 patches of `hidden_size`, `num_layers` pre-norm layers
  (LayerNorm, multi-head attention with biases, tanh-GELU MLP), a final LayerNorm. Defaults are transformers'."""
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_layers: int = 12
  num_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 16
  layer_norm_eps: float = 1e-6
  hf_extra_json: str = "{}"

  def __post_init__(self):
    check_field_types(self)
    if self.image_size % self.patch_size or self.hidden_size % self.num_heads:
      raise ValueError(f"SiglipVisionConfig: image_size {self.image_size} must be a multiple of patch_size "
                       f"{self.patch_size}, hidden_size {self.hidden_size} of num_heads {self.num_heads}")

  @property
  def patches_per_side(self) -> int:
    return self.image_size // self.patch_size

  def replace(self, **changes) -> "SiglipVisionConfig":
    return dataclasses.replace(self, **changes)


def siglip_config_from_hf(hf: dict[str, Any], *, source: str) -> SiglipVisionConfig:
  if hf.get("vision_use_head", True):
    raise ConversionError(f"{source}: vision_use_head=true is not supported (T5Gemma 2 reads the tower's last hidden "
                          "states; its checkpoints have no pooling head)")
  act = hf.get("hidden_act", "gelu_pytorch_tanh")
  if act not in ("gelu_pytorch_tanh", "gelu_new"):
    raise ConversionError(f"{source}: vision hidden_act {act!r} is not supported (tanh GELU is)")
  for key in ("image_size", "patch_size"):
    if isinstance(hf.get(key), (list, tuple)):
      raise ConversionError(f"{source}: a non-square vision {key} {hf[key]} is not supported")
  extra = {k: v for k, v in hf.items() if k not in _OWNED_KEYS}
  return build_config(
      SiglipVisionConfig, source, hidden_size=hf.get("hidden_size", 768),
      intermediate_size=hf.get("intermediate_size", 3072), num_layers=hf.get("num_hidden_layers", 12),
      num_heads=hf.get("num_attention_heads", 12), num_channels=hf.get("num_channels", 3),
      image_size=hf.get("image_size", 224), patch_size=hf.get("patch_size", 16),
      layer_norm_eps=hf.get("layer_norm_eps", 1e-6), hf_extra_json=json.dumps(extra, sort_keys=True))


def siglip_config_to_hf(config: SiglipVisionConfig) -> dict[str, Any]:
  hf = json.loads(config.hf_extra_json)
  hf.update({"model_type": "siglip_vision_model", "hidden_size": config.hidden_size,
             "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
             "num_attention_heads": config.num_heads, "num_channels": config.num_channels,
             "image_size": config.image_size, "patch_size": config.patch_size, "hidden_act": "gelu_pytorch_tanh",
             "layer_norm_eps": config.layer_norm_eps, "vision_use_head": False})
  return hf
