"""T5 / mT5 / umT5 config, from and to transformers' `config.json`."""

import dataclasses
import json
from typing import Any

import gin

from t5x_lite.config.fields import build_config, check_field_types, labels_and_extras
from t5x_lite.errors import ConversionError

T5_MODEL_TYPES = ("t5", "mt5", "umt5")

# transformers architecture name (without the family prefix) -> our task name.
T5_TASKS = {
    "ForConditionalGeneration": "lm",
    "EncoderModel": "encoder",
    "ForSequenceClassification": "seq_cls",
    "ForTokenClassification": "token_cls",
    "ForQuestionAnswering": "qa",
}
_HF_PREFIX = {"t5": "T5", "mt5": "MT5", "umt5": "UMT5"}

# Fields of ours that we write ourselves; every other key of the original config.json is carried through
# unchanged on export (label maps, task_specific_params, ...).
_T5_OWNED_KEYS = {
    "architectures", "model_type", "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers",
    "num_heads", "relative_attention_num_buckets", "relative_attention_max_distance", "feed_forward_proj",
    "dense_act_fn", "is_gated_act", "layer_norm_epsilon", "dropout_rate", "tie_word_embeddings",
    "scale_decoder_outputs", "pad_token_id", "eos_token_id", "decoder_start_token_id", "num_labels",
    "id2label", "label2id", "dtype", "torch_dtype", "is_encoder_decoder", "transformers_version",
    "classifier_dropout",
}

_FF_ACTIVATIONS = {"relu": "relu", "gelu": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                   "silu": "silu", "swish": "silu"}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class T5Config:
  """T5 / T5v1.1 / mT5 / umT5 encoder-decoder (and its encoder-only and head variants).

  Defaults are t5-small. `task` picks the head: "lm" (conditional generation), "encoder" (encoder only),
  "seq_cls", "token_cls", "qa".
  """
  vocab_size: int = 32128
  d_model: int = 512
  num_heads: int = 8
  head_dim: int = 64
  d_ff: int = 2048
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  relative_bias_per_layer: bool = False  # umT5: every layer has its own bias table
  mlp_activation: str = "relu"  # relu | gelu_tanh | gelu | silu
  mlp_gated: bool = False
  tie_lm_head: bool = True  # logits use the shared embedding (else a separate lm_head)
  scale_decoder_outputs: bool = True  # multiply by d_model**-0.5 before the head (original T5, umT5)
  layer_norm_epsilon: float = 1e-6
  dropout_rate: float = 0.0
  pad_token_id: int = 0
  eos_token_id: int = 1
  decoder_start_token_id: int = 0
  model_type: str = "t5"
  task: str = "lm"
  num_labels: int = 2
  classifier_dropout: float = 0.0
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  remat: str = "none"  # none | full | dots
  hf_extra_json: str = "{}"  # config.json keys we do not interpret, written back on export

  family = "t5"

  def __post_init__(self):
    check_field_types(self)
    if self.task != "lm":  # no LM head, so no separate one: the flag is moot, kept at its default (one model,
      object.__setattr__(self, "tie_lm_head", True)  # one config; it is what a loaded checkpoint gets)

  @property
  def is_encoder_decoder(self) -> bool:
    return self.task != "encoder" and self.task != "token_cls"

  def replace(self, **changes) -> "T5Config":
    return dataclasses.replace(self, **changes)

  def canonical(self) -> "T5Config":
    """The config as compared for what it computes (a T5 config says it one way only)."""
    return self


def t5_config_from_hf(hf: dict[str, Any], tensor_names: set[str] | None = None, *, source: str = "config.json"
                      ) -> T5Config:
  """T5Config from a transformers config dict; `tensor_names` (the checkpoint's) tells a separate lm_head."""
  model_type = hf.get("model_type")
  if model_type not in T5_MODEL_TYPES:
    raise ConversionError(f"{source}: model_type {model_type!r} is not a T5 type {T5_MODEL_TYPES}")
  archs = hf.get("architectures") or [f"{_HF_PREFIX[model_type]}ForConditionalGeneration"]
  task = None
  for suffix, name in T5_TASKS.items():
    if archs[0] == _HF_PREFIX[model_type] + suffix:
      task = name
  if task is None:
    raise ConversionError(f"{source}: architecture {archs[0]!r} is not supported for model_type {model_type!r}; "
                          f"supported: {[_HF_PREFIX[model_type] + s for s in T5_TASKS]}")
  ff = hf.get("feed_forward_proj", "relu")
  act_parts = ff.split("-")
  if act_parts[-1] not in _FF_ACTIVATIONS or len(act_parts) > 2 or (len(act_parts) == 2 and act_parts[0] != "gated"):
    raise ConversionError(f"{source}: feed_forward_proj {ff!r} is not supported")
  names = tensor_names or set()
  separate_head = any(n.endswith("lm_head.weight") for n in names)
  if model_type == "t5":
    scale = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False)
  else:
    # transformers forces tie_word_embeddings=True for mT5 and umT5; mT5 never rescales, umT5 always does.
    scale = model_type == "umt5"
  num_layers = hf.get("num_layers", 6)
  num_labels, extra = labels_and_extras(hf, _T5_OWNED_KEYS)
  return build_config(
      T5Config, source,
      vocab_size=hf.get("vocab_size", 32128), d_model=hf.get("d_model", 512), num_heads=hf.get("num_heads", 8),
      head_dim=hf.get("d_kv", 64), d_ff=hf.get("d_ff", 2048), num_encoder_layers=num_layers,
      num_decoder_layers=hf.get("num_decoder_layers") or num_layers,
      relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
      relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
      relative_bias_per_layer=model_type == "umt5",
      mlp_activation=_FF_ACTIVATIONS[act_parts[-1]], mlp_gated=act_parts[0] == "gated" and len(act_parts) == 2,
      tie_lm_head=not separate_head, scale_decoder_outputs=bool(scale),
      layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6), dropout_rate=hf.get("dropout_rate", 0.1),
      pad_token_id=hf.get("pad_token_id", 0) if hf.get("pad_token_id") is not None else 0,
      eos_token_id=_first(hf.get("eos_token_id", 1)),
      decoder_start_token_id=hf.get("decoder_start_token_id") if hf.get("decoder_start_token_id") is not None
      else 0,
      model_type=model_type, task=task, num_labels=num_labels,
      classifier_dropout=hf.get("classifier_dropout", 0.0) or 0.0,
      hf_extra_json=json.dumps(extra, sort_keys=True))


def t5_config_to_hf(config: T5Config) -> dict[str, Any]:
  """The config.json dict transformers reads back to the same model."""
  suffix = {v: k for k, v in T5_TASKS.items()}[config.task]
  act = {"relu": "relu", "gelu_tanh": "gelu_new", "gelu": "gelu", "silu": "silu"}[config.mlp_activation]
  hf = json.loads(config.hf_extra_json)
  hf.update({
      "architectures": [_HF_PREFIX[config.model_type] + suffix], "model_type": config.model_type,
      "vocab_size": config.vocab_size, "d_model": config.d_model, "d_kv": config.head_dim, "d_ff": config.d_ff,
      "num_layers": config.num_encoder_layers, "num_decoder_layers": config.num_decoder_layers,
      "num_heads": config.num_heads, "relative_attention_num_buckets": config.relative_attention_num_buckets,
      "relative_attention_max_distance": config.relative_attention_max_distance,
      "feed_forward_proj": ("gated-" if config.mlp_gated else "") + ("gelu" if act == "gelu_new" else act),
      "layer_norm_epsilon": config.layer_norm_epsilon, "dropout_rate": config.dropout_rate,
      "pad_token_id": config.pad_token_id, "eos_token_id": config.eos_token_id,
      "decoder_start_token_id": config.decoder_start_token_id, "is_encoder_decoder": config.is_encoder_decoder,
      "classifier_dropout": config.classifier_dropout, "dtype": config.param_dtype,
  })
  if config.model_type == "t5":
    # transformers 5.x derives scale_decoder_outputs from the tie_word_embeddings key it is given.
    hf["tie_word_embeddings"] = config.scale_decoder_outputs
    hf["scale_decoder_outputs"] = config.scale_decoder_outputs
  if config.task in ("seq_cls", "token_cls", "qa") and "id2label" not in hf:
    hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(config.num_labels)}
    hf["label2id"] = {f"LABEL_{i}": i for i in range(config.num_labels)}
  return hf


def _first(x):
  return x[0] if isinstance(x, (list, tuple)) else x
