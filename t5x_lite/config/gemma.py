"""Gemma 1 / 2 / 3 (text) config, from and to transformers' `config.json`.

One dataclass covers the three generations; the differences are fields (sandwich norms, q/k norms,
soft-caps, per-layer-type RoPE, sliding windows), not subclasses.
"""

import dataclasses
import json
from typing import Any

import gin

from t5x_lite.config.fields import build_config, check_field_types, labels_and_extras
from t5x_lite.errors import ConversionError

GEMMA_MODEL_TYPES = ("gemma", "gemma2", "gemma3_text", "gemma3")
SLIDING, FULL = "sliding_attention", "full_attention"

_ARCH = {  # (model_type, architecture) -> task
    **{(t, f"{p}ForCausalLM"): "lm" for t, p in (("gemma", "Gemma"), ("gemma2", "Gemma2"), ("gemma3_text", "Gemma3"))},
    **{(t, f"{p}ForSequenceClassification"): "seq_cls"
       for t, p in (("gemma", "Gemma"), ("gemma2", "Gemma2"), ("gemma3_text", "Gemma3Text"))},
    **{(t, f"{p}ForTokenClassification"): "token_cls" for t, p in (("gemma", "Gemma"), ("gemma2", "Gemma2"))},
    ("gemma3", "Gemma3ForConditionalGeneration"): "lm",
}
_EXPORT_ARCH = {(t, task): arch for (t, arch), task in _ARCH.items() if t != "gemma3"}

_OWNED_KEYS = {
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "query_pre_attn_scalar",
    "attn_logit_softcapping", "final_logit_softcapping", "sliding_window", "layer_types", "rope_parameters",
    "rope_theta", "rope_local_base_freq", "rope_scaling", "sliding_window_pattern", "_sliding_window_pattern",
    "use_bidirectional_attention", "tie_word_embeddings", "pad_token_id", "eos_token_id", "bos_token_id",
    "hidden_act", "hidden_activation", "attention_bias", "num_labels", "id2label", "label2id", "dtype",
    "torch_dtype", "transformers_version", "classifier_dropout", "token_classification_bias",
}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class GemmaConfig:
  """Decoder-only Gemma. Defaults are Gemma 3 1B's text shape. `task`: "lm" | "seq_cls" | "token_cls"."""
  vocab_size: int = 262144
  d_model: int = 1152
  num_heads: int = 4
  num_kv_heads: int = 1
  head_dim: int = 256
  d_ff: int = 6912
  num_layers: int = 26
  layer_types: tuple[str, ...] | None = None  # per layer SLIDING or FULL; None: use sliding_pattern
  sliding_pattern: int | None = 6  # no layer_types: layer i is full when (i+1) % pattern == 0; None: all full
  sliding_window: int | None = 512
  query_pre_attn_scalar: float | None = 256  # attention scale is its -0.5 power (None: head_dim)
  attn_logit_softcap: float | None = None  # Gemma 2 only
  final_logit_softcap: float | None = None
  sandwich_norms: bool = True  # Gemma 2/3: norms after attention and MLP as well as before
  qk_norm: bool = True  # Gemma 3
  rope_theta: float = 1_000_000.0  # full-attention layers
  rope_scaling: float = 1.0  # linear factor, full-attention layers only
  rope_local_theta: float = 10_000.0  # sliding layers
  bidirectional: bool = False  # Gemma 3 use_bidirectional_attention (EmbeddingGemma style)
  eoi_token_id: int | None = None  # T5Gemma 2's stacks: this id embeds as its own learned vector (embed/eoi)
  mlp_activation: str = "gelu_tanh"
  rms_norm_eps: float = 1e-6
  tie_lm_head: bool = True
  pad_token_id: int = 0
  eos_token_id: int = 1
  bos_token_id: int = 2
  model_type: str = "gemma3_text"
  task: str = "lm"
  num_labels: int = 2
  token_classification_bias: bool = True
  classifier_dropout: float = 0.0
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"
  hf_extra_json: str = "{}"

  family = "gemma"
  is_encoder_decoder = False

  def __post_init__(self):
    check_field_types(self)
    if self.layer_types is not None and len(self.layer_types) != self.num_layers:
      raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
    if self.layer_types is not None:  # the pattern is moot beside explicit types: one model, one config
      object.__setattr__(self, "sliding_pattern", None)

  @property
  def sliding_layers(self) -> tuple[bool, ...]:
    if self.layer_types is not None:
      return tuple(t == SLIDING for t in self.layer_types)
    if self.sliding_pattern is None or self.sliding_window is None:
      return (False,) * self.num_layers
    return tuple((i + 1) % self.sliding_pattern != 0 for i in range(self.num_layers))

  def replace(self, **changes) -> "GemmaConfig":
    return dataclasses.replace(self, **changes)

  def canonical(self) -> "GemmaConfig":
    """The same model with its layer types written out (the pattern is one of two ways to say them), for
    comparing what two configs compute."""
    return self.replace(layer_types=tuple(SLIDING if s else FULL for s in self.sliding_layers), sliding_pattern=None)


def _rope(hf: dict, model_type: str, source: str) -> tuple[float, float, float]:
  """(full theta, full linear factor, sliding theta) from rope_parameters or the legacy keys."""
  params = hf.get("rope_parameters") or {}
  if FULL in params or SLIDING in params:
    full, local = params.get(FULL, {}), params.get(SLIDING, {})
  else:
    full = dict(params) if params else {"rope_theta": hf.get("rope_theta", 10_000.0 if model_type in
                                                              ("gemma", "gemma2") else 1_000_000.0)}
    if hf.get("rope_scaling"):
      full.update(hf["rope_scaling"])
    local = {"rope_theta": hf.get("rope_local_base_freq", full.get("rope_theta", 10_000.0))
             if model_type.startswith("gemma3") else full.get("rope_theta", 10_000.0)}
  for p in (full, local):
    kind = p.get("rope_type", p.get("type", "default"))
    if kind not in ("default", "linear"):
      raise ConversionError(f"{source}: rope_type {kind!r} is not supported (default and linear are)")
  factor = float(full.get("factor", 1.0)) if full.get("rope_type", full.get("type")) == "linear" else 1.0
  return float(full.get("rope_theta", 10_000.0)), factor, float(local.get("rope_theta", 10_000.0))


def gemma_config_from_hf(hf: dict[str, Any], tensor_names: set[str] | None = None, *,
                         source: str = "config.json") -> GemmaConfig:
  model_type = hf.get("model_type")
  if model_type not in GEMMA_MODEL_TYPES:
    raise ConversionError(f"{source}: model_type {model_type!r} is not a Gemma type {GEMMA_MODEL_TYPES}")
  arch = (hf.get("architectures") or [None])[0]
  defaults = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
              "gemma3": "Gemma3ForConditionalGeneration"}
  arch = arch or defaults[model_type]
  task = _ARCH.get((model_type, arch))
  if task is None:
    supported = [a for (t, a) in _ARCH if t == model_type]
    raise ConversionError(f"{source}: architecture {arch!r} is not supported for {model_type!r}; "
                          f"supported: {supported}")
  outer = hf
  if model_type == "gemma3":  # the text part of the multimodal model
    hf = dict(hf.get("text_config") or {})
    hf.setdefault("model_type", "gemma3_text")
  if hf.get("attention_bias"):
    raise ConversionError(f"{source}: attention_bias=true is not supported (no Gemma checkpoint uses it)")
  gen3 = model_type.startswith("gemma3")
  if hf.get("use_bidirectional_attention") and not gen3:
    raise ConversionError(f"{source}: use_bidirectional_attention is only supported for Gemma 3 (transformers "
                          f"applies it inconsistently to {model_type})")
  act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
  if act not in ("gelu_pytorch_tanh", "gelu", "gelu_new"):  # transformers maps Gemma's "gelu" to tanh GELU
    raise ConversionError(f"{source}: hidden activation {act!r} is not supported")
  num_layers = hf.get("num_hidden_layers", 26)
  layer_types = hf.get("layer_types")
  if layer_types is None and model_type == "gemma2":
    layer_types = [SLIDING if (i + 1) % 2 else FULL for i in range(num_layers)]
  if layer_types is None and gen3:
    period = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
    layer_types = [SLIDING if (i + 1) % period else FULL for i in range(num_layers)]
  if layer_types is not None and set(layer_types) - {SLIDING, FULL}:
    raise ConversionError(f"{source}: layer_types holds unknown types {sorted(set(layer_types) - {SLIDING, FULL})}")
  theta, factor, local_theta = _rope(hf, model_type if not gen3 else "gemma3_text", source)
  head_dim = hf.get("head_dim", 256)
  names = tensor_names or set()
  num_labels, extra = labels_and_extras(outer, _OWNED_KEYS | {"text_config"})
  return build_config(
      GemmaConfig, source,
      vocab_size=hf.get("vocab_size", 256000), d_model=hf.get("hidden_size", 3072),
      num_heads=hf.get("num_attention_heads", 16), num_kv_heads=hf.get("num_key_value_heads", 16),
      head_dim=head_dim, d_ff=hf.get("intermediate_size", 24576), num_layers=num_layers,
      layer_types=tuple(layer_types) if layer_types else None, sliding_pattern=None,
      sliding_window=hf.get("sliding_window"),
      query_pre_attn_scalar=hf.get("query_pre_attn_scalar") if model_type != "gemma" else None,
      attn_logit_softcap=hf.get("attn_logit_softcapping") if model_type == "gemma2" else None,
      # Gemma3ForConditionalGeneration never applies its text config's final soft-cap; the text model does.
      final_logit_softcap=hf.get("final_logit_softcapping") if model_type not in ("gemma", "gemma3") else None,
      sandwich_norms=model_type != "gemma", qk_norm=gen3, rope_theta=theta, rope_scaling=factor,
      rope_local_theta=local_theta, bidirectional=bool(hf.get("use_bidirectional_attention")),
      rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
      tie_lm_head=not any(n.endswith("lm_head.weight") for n in names),
      pad_token_id=_first(hf.get("pad_token_id", outer.get("pad_token_id", 0)), 0),
      eos_token_id=_first(hf.get("eos_token_id", outer.get("eos_token_id", 1)), 1),
      bos_token_id=_first(hf.get("bos_token_id", outer.get("bos_token_id", 2)), 2),
      model_type=model_type, task=task, num_labels=num_labels,
      token_classification_bias=outer.get("token_classification_bias", True),
      classifier_dropout=outer.get("classifier_dropout") or 0.0,
      hf_extra_json=json.dumps(extra, sort_keys=True))


def gemma_config_to_hf(config: GemmaConfig) -> dict[str, Any]:
  """config.json for transformers. The text part of a multimodal `gemma3` exports as `gemma3_text`."""
  model_type = "gemma3_text" if config.model_type == "gemma3" else config.model_type
  if (model_type, config.task) not in _EXPORT_ARCH:
    raise ConversionError(f"transformers has no {model_type} model for task {config.task!r} (it has "
                          f"{sorted(task for (t, task) in _EXPORT_ARCH if t == model_type)}): this model cannot be "
                          "exported")
  hf = json.loads(config.hf_extra_json)
  hf.update({
      "architectures": [_EXPORT_ARCH[(model_type, config.task)]], "model_type": model_type,
      "vocab_size": config.vocab_size, "hidden_size": config.d_model, "intermediate_size": config.d_ff,
      "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim, "rms_norm_eps": config.rms_norm_eps,
      "tie_word_embeddings": config.tie_lm_head, "pad_token_id": config.pad_token_id,
      "eos_token_id": config.eos_token_id, "bos_token_id": config.bos_token_id, "attention_bias": False,
      "hidden_activation": "gelu_pytorch_tanh", "dtype": config.param_dtype,
  })
  if model_type == "gemma":
    hf["hidden_act"] = "gelu_pytorch_tanh"
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": config.rope_theta}
  else:
    hf.update(query_pre_attn_scalar=config.query_pre_attn_scalar, sliding_window=config.sliding_window,
              final_logit_softcapping=config.final_logit_softcap,
              layer_types=[SLIDING if s else FULL for s in config.sliding_layers])
  if model_type == "gemma2":
    hf["attn_logit_softcapping"] = config.attn_logit_softcap
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": config.rope_theta}
  if model_type == "gemma3_text":
    full = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling != 1.0:
      full = {"rope_type": "linear", "factor": config.rope_scaling, "rope_theta": config.rope_theta}
    hf["rope_parameters"] = {FULL: full, SLIDING: {"rope_type": "default", "rope_theta": config.rope_local_theta}}
    hf["use_bidirectional_attention"] = config.bidirectional
  if config.task == "token_cls":
    hf["token_classification_bias"] = config.token_classification_bias
    hf["classifier_dropout"] = config.classifier_dropout
  if config.task in ("seq_cls", "token_cls") and "id2label" not in hf:
    hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(config.num_labels)}
    hf["label2id"] = {f"LABEL_{i}": i for i in range(config.num_labels)}
  return hf


def _first(x, default):
  if isinstance(x, (list, tuple)):
    x = x[0] if x else None
  return default if x is None else x
