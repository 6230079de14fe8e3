"""T5Gemma 2 config: a Gemma 3 encoder and decoder sharing one embedding, from and to transformers' nested
`T5Gemma2Config` (encoder.text_config, encoder.vision_config, decoder).

Each stack is a `GemmaConfig` (model_type "gemma3_text", its own depth, heads, windows, layer types and RoPE); what
the two share (the vocabulary, the width, the special ids, dtypes) lives here and is pushed down into them.
"""

import dataclasses
import json
import math
from typing import Any

import gin

from t5x_lite.config.fields import build_config, check_field_types, labels_and_extras
from t5x_lite.config.gemma import GemmaConfig, gemma_config_from_hf, gemma_config_to_hf
from t5x_lite.config.siglip import SiglipVisionConfig, siglip_config_from_hf, siglip_config_to_hf
from t5x_lite.errors import ConversionError

T5GEMMA2_MODEL_TYPES = ("t5gemma2",)
_ARCH = {"T5Gemma2ForConditionalGeneration": "lm", "T5Gemma2ForSequenceClassification": "seq_cls",
         "T5Gemma2ForTokenClassification": "token_cls"}
# Keys of transformers' top-level and encoder configs that we write ourselves; the rest ride along.
_OWNED = {"architectures", "model_type", "encoder", "decoder", "is_encoder_decoder", "dropout_rate",
          "classifier_dropout_rate", "image_token_index", "eoi_token_index", "tie_word_embeddings", "bos_token_id",
          "pad_token_id", "eos_token_id", "decoder_start_token_id", "vocab_size", "num_labels", "id2label",
          "label2id", "dtype", "torch_dtype", "transformers_version"}
_ENCODER_OWNED = {"model_type", "text_config", "vision_config", "mm_tokens_per_image", "boi_token_index",
                  "eoi_token_index", "image_token_index", "tie_word_embeddings"}
# What a stack's GemmaConfig writes that T5Gemma 2's text and decoder configs do not have.
_NOT_STACK_KEYS = ("architectures", "use_bidirectional_attention", "dtype")


def _stack(**fields) -> GemmaConfig:
  return GemmaConfig(**{"vocab_size": 262_208, "d_model": 2304, "num_heads": 8, "num_kv_heads": 4, "head_dim": 256,
                        "d_ff": 9216, "num_layers": 26, "sliding_window": 4096, **fields})


@gin.configurable
@dataclasses.dataclass(frozen=True)
class T5Gemma2Config:
  """T5Gemma 2: `encoder` and `decoder` stacks (GemmaConfig, Gemma 3 layers), tied embeddings (encoder, decoder and
  head), an end-of-image token with its own vector, and a SigLIP `vision` tower whose pooled, projected output
  stands at the image tokens of the encoder's input. Defaults are transformers'. `task`: "lm" | "seq_cls" | "token_cls"."""
  encoder: GemmaConfig = _stack()
  decoder: GemmaConfig = _stack()
  vision: SiglipVisionConfig = SiglipVisionConfig()
  mm_tokens_per_image: int = 256
  boi_token_index: int = 255_999
  eoi_token_index: int = 256_000
  image_token_index: int = 256_001
  pad_token_id: int = 0
  eos_token_id: int = 1
  bos_token_id: int = 2
  decoder_start_token_id: int = 2  # transformers: unset, so generation starts from bos
  task: str = "lm"
  num_labels: int = 2
  classifier_dropout: float = 0.0
  dropout_rate: float = 0.0
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"
  encoder_hf_extra_json: str = "{}"  # transformers' encoder config keys we do not interpret
  hf_extra_json: str = "{}"

  family = "t5gemma2"
  model_type = "t5gemma2"
  is_encoder_decoder = True

  def __post_init__(self):
    for name, cls in (("encoder", GemmaConfig), ("decoder", GemmaConfig), ("vision", SiglipVisionConfig)):
      if isinstance(getattr(self, name), dict):  # read back from JSON (config_to_json writes nested dicts)
        object.__setattr__(self, name, cls(**getattr(self, name)))
    check_field_types(self)
    if not isinstance(self.encoder, GemmaConfig) or not isinstance(self.decoder, GemmaConfig):
      raise ValueError("T5Gemma2Config.encoder and .decoder must be GemmaConfig stacks")
    if self.task not in ("lm", "seq_cls", "token_cls"):
      raise ValueError(f"T5Gemma2Config.task must be lm, seq_cls or token_cls, got {self.task!r}")
    for what in ("vocab_size", "d_model"):
      if getattr(self.encoder, what) != getattr(self.decoder, what):
        raise ValueError(f"T5Gemma 2 shares one embedding: encoder and decoder {what} must be equal, got "
                         f"{getattr(self.encoder, what)} and {getattr(self.decoder, what)}")
    if self.dropout_rate:
      raise ValueError(f"T5Gemma2Config.dropout_rate {self.dropout_rate}: dropout is not implemented for T5Gemma 2 "
                       "(its checkpoints use 0)")
    # One model, one config: what the stacks must share or cannot vary is set here, not in them.
    common = dict(model_type="gemma3_text", task="lm", tie_lm_head=True, qk_norm=True, sandwich_norms=True,
                  bidirectional=False, attn_logit_softcap=None, eoi_token_id=self.eoi_token_index,
                  pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_id, bos_token_id=self.bos_token_id,
                  dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat, num_labels=2,
                  classifier_dropout=0.0)
    for name in ("encoder", "decoder"):
      object.__setattr__(self, name, getattr(self, name).replace(**common))

  @property
  def vocab_size(self) -> int:
    return self.decoder.vocab_size

  @property
  def tokens_per_side(self) -> int:
    """The side of the square each image's patch grid is average-pooled to (mm_tokens_per_image tokens).
    Checked here, where images are read, not on construction: transformers' own defaults (224 px / 16 and 256
    tokens) cannot pool either, and text-only configs carry them."""
    side = math.isqrt(self.mm_tokens_per_image)
    if side * side != self.mm_tokens_per_image or self.vision.patches_per_side % side:
      raise ValueError(f"mm_tokens_per_image {self.mm_tokens_per_image} must be a square whose side divides the "
                       f"vision tower's {self.vision.patches_per_side} patches per side, to pool images")
    return side

  @property
  def d_model(self) -> int:
    return self.decoder.d_model

  def replace(self, **changes) -> "T5Gemma2Config":
    return dataclasses.replace(self, **changes)

  def canonical(self) -> "T5Gemma2Config":
    return self.replace(encoder=self.encoder.canonical(), decoder=self.decoder.canonical())


def _stack_from_hf(stack: dict, source: str) -> GemmaConfig:
  """A T5Gemma 2 text or decoder config dict read as the Gemma 3 text stack it is."""
  return gemma_config_from_hf({**stack, "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"]},
                              set(), source=source)


def _stack_to_hf(stack: GemmaConfig, model_type: str) -> dict:
  hf = gemma_config_to_hf(stack)
  for key in _NOT_STACK_KEYS:
    hf.pop(key, None)
  hf["model_type"] = model_type
  return hf


def t5gemma2_config_from_hf(hf: dict[str, Any], tensor_names: set[str] | None = None, *,
                            source: str = "config.json") -> T5Gemma2Config:  # pylint: disable=unused-argument
  if hf.get("model_type") not in T5GEMMA2_MODEL_TYPES:
    raise ConversionError(f"{source}: model_type {hf.get('model_type')!r} is not T5Gemma 2")
  arch = (hf.get("architectures") or ["T5Gemma2ForConditionalGeneration"])[0]
  if arch not in _ARCH:
    raise ConversionError(f"{source}: architecture {arch!r} is not supported; supported: {sorted(_ARCH)}")
  encoder = dict(hf.get("encoder") or {})
  text, decoder = dict(encoder.get("text_config") or {}), dict(hf.get("decoder") or {})
  if text.get("vocab_size") != decoder.get("vocab_size") or text.get("hidden_size") != decoder.get("hidden_size"):
    raise ConversionError(f"{source}: encoder.text_config and decoder must have one vocab_size and hidden_size "
                          f"(got {text.get('vocab_size')}/{text.get('hidden_size')} and "
                          f"{decoder.get('vocab_size')}/{decoder.get('hidden_size')})")
  vision = siglip_config_from_hf(dict(encoder.get("vision_config") or {}), source=f"{source} (encoder.vision_config)")
  bos = hf.get("bos_token_id", decoder.get("bos_token_id", 2))
  num_labels, extra = labels_and_extras(hf, _OWNED)
  return build_config(
      T5Gemma2Config, source,
      encoder=_stack_from_hf(text, f"{source} (encoder.text_config)"),
      decoder=_stack_from_hf(decoder, f"{source} (decoder)"), vision=vision,
      mm_tokens_per_image=encoder.get("mm_tokens_per_image", 256),
      boi_token_index=encoder.get("boi_token_index", 255_999),
      eoi_token_index=hf.get("eoi_token_index") or encoder.get("eoi_token_index", 256_000),
      image_token_index=hf.get("image_token_index", 256_001),
      pad_token_id=hf.get("pad_token_id", decoder.get("pad_token_id", 0)),
      eos_token_id=_first(hf.get("eos_token_id", decoder.get("eos_token_id", 1))), bos_token_id=bos,
      decoder_start_token_id=hf.get("decoder_start_token_id") if hf.get("decoder_start_token_id") is not None
      else bos, task=_ARCH[arch], num_labels=num_labels,
      classifier_dropout=float(hf.get("classifier_dropout_rate") or 0.0),
      dropout_rate=float(hf.get("dropout_rate") or 0.0),
      encoder_hf_extra_json=json.dumps({k: v for k, v in encoder.items() if k not in _ENCODER_OWNED},
                                       sort_keys=True),
      hf_extra_json=json.dumps(extra, sort_keys=True))


def t5gemma2_config_to_hf(config: T5Gemma2Config) -> dict[str, Any]:
  """The nested config.json transformers reads back to the same model."""
  encoder = json.loads(config.encoder_hf_extra_json)
  encoder.update({"model_type": "t5gemma2_encoder", "text_config": _stack_to_hf(config.encoder, "t5gemma2_text"),
                  "vision_config": siglip_config_to_hf(config.vision),
                  "mm_tokens_per_image": config.mm_tokens_per_image, "boi_token_index": config.boi_token_index,
                  "eoi_token_index": config.eoi_token_index, "image_token_index": config.image_token_index,
                  "tie_word_embeddings": True})
  hf = json.loads(config.hf_extra_json)
  arch = {task: name for name, task in _ARCH.items()}[config.task]
  hf.update({"architectures": [arch], "model_type": "t5gemma2", "encoder": encoder,
             "decoder": _stack_to_hf(config.decoder, "t5gemma2_decoder"), "is_encoder_decoder": True,
             "dropout_rate": config.dropout_rate, "classifier_dropout_rate": config.classifier_dropout,
             "image_token_index": config.image_token_index, "eoi_token_index": config.eoi_token_index,
             "tie_word_embeddings": True, "bos_token_id": config.bos_token_id, "pad_token_id": config.pad_token_id,
             "eos_token_id": config.eos_token_id, "vocab_size": config.vocab_size, "dtype": config.param_dtype})
  if config.decoder_start_token_id != config.bos_token_id:
    hf["decoder_start_token_id"] = config.decoder_start_token_id
  if config.task in ("seq_cls", "token_cls") and "id2label" not in hf:
    hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(config.num_labels)}
    hf["label2id"] = {f"LABEL_{i}": i for i in range(config.num_labels)}
  return hf


def _first(x):
  return x[0] if isinstance(x, (list, tuple)) else x
