"""Param counts of the published Gemma shapes (configs/models/*.gin), computed with jax.eval_shape (nothing
allocated), against the published totals and transformers' count of the same config on the meta device."""

import math
import os

import gin
import jax
import pytest
import torch
import transformers as tf

from t5x_lite.config import GemmaConfig, gemma_config_from_hf
from t5x_lite.models import gemma
from t5x_lite.models.params import init_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Parameter totals (text model, tied embedding counted once): the technical reports' non-embedding counts
# (NON_EMBEDDING below) plus the released V x D table.
PUBLISHED = {
    "gemma_2b": 2_506_172_416, "gemma_7b": 8_537_680_896,
    "gemma2_2b": 2_614_341_888, "gemma2_9b": 9_241_705_984, "gemma2_27b": 27_227_128_320,
    "gemma3_270m": 268_098_176, "gemma3_1b": 999_885_952, "gemma3_4b": 3_880_263_168,
    "gemma3_12b": 11_766_034_176,
    "gemma3_27b": 27_009_346_304,  # the text part of the 27B release (its vision tower is not counted)
}
# Non-embedding parameters as published: (stated, tolerance = half a unit of the last stated digit).
#   Gemma 1: Gemma Team 2024, arXiv:2403.08295, Table 2 (exact).
#   Gemma 2: Gemma Team 2024, arXiv:2408.00118, Table 2 (exact).
#   Gemma 3: Gemma Team 2025, arXiv:2503.19786, Table 1 (in millions); 270M: its model card (google/gemma-3-270m,
#   "100 million for our transformer blocks").
# The reports' embedding columns are not checked: Gemma 1 and 2 count 256,128 rows (524,550,144 = 256128 x 2048),
# 128 more than the released 256,000-row tables, and Gemma 3's (675M, 1,012M, 1,416M for 4B/12B/27B) are a few
# million above V x D (671M, 1,007M, 1,410M), apparently with part of the image path counted.
NON_EMBEDDING = {
    "gemma_2b": (1_981_884_416, 0), "gemma_7b": (7_751_248_896, 0),
    "gemma2_2b": (2_024_517_888, 0), "gemma2_9b": (8_324_201_984, 0), "gemma2_27b": (26_047_480_320, 0),
    "gemma3_270m": (100e6, 0.5e6), "gemma3_1b": (698e6, 0.5e6), "gemma3_4b": (3_209e6, 0.5e6),
    "gemma3_12b": (10_759e6, 0.5e6), "gemma3_27b": (25_600e6, 0.5e6),
}
HF_CLASSES = {"gemma": (tf.GemmaConfig, tf.GemmaForCausalLM), "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM),
              "gemma3_text": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM)}


def _config(name):
  gin.clear_config()
  try:
    gin.parse_config_file(os.path.join(REPO, "configs", "models", f"{name}.gin"))
    return GemmaConfig()
  finally:
    gin.clear_config()


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_param_count(name):
  config = _config(name)
  shapes = jax.eval_shape(lambda key: init_params(gemma.param_specs(config), key), jax.random.key(0))
  ours = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
  assert ours == PUBLISHED[name]
  stated, tolerance = NON_EMBEDDING[name]
  assert abs(ours - config.vocab_size * config.d_model - stated) <= tolerance
  config_cls, model_cls = HF_CLASSES[config.model_type]
  hf_config = config_cls(vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.d_ff,
                         num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
                         num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim)
  with torch.device("meta"):
    assert model_cls(hf_config).num_parameters() == ours


def test_gemma3_1b_layer_pattern():
  config = _config("gemma3_1b")
  assert [i for i, s in enumerate(config.sliding_layers) if not s] == [5, 11, 17, 23]
  assert _config("gemma2_2b").sliding_layers[:4] == (True, False, True, False)
  assert not any(_config("gemma_7b").sliding_layers)


# The published config.json of each shape as google released it (legacy keys; the text_config of the multimodal
# Gemma 3 4B/12B/27B releases, with Gemma3TextConfig's defaults written out where the release leaves them out). The
# checkpoint of each is named at the top of its gin file.
_GEMMA1 = dict(model_type="gemma", vocab_size=256000, head_dim=256, rms_norm_eps=1e-6, rope_theta=10000.0,
               hidden_act="gelu", max_position_embeddings=8192, pad_token_id=0, eos_token_id=1, bos_token_id=2)
_GEMMA2 = dict(model_type="gemma2", vocab_size=256000, rms_norm_eps=1e-6, rope_theta=10000.0, sliding_window=4096,
               attn_logit_softcapping=50.0, final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh",
               max_position_embeddings=8192, pad_token_id=0, eos_token_id=1, bos_token_id=2)
_GEMMA3 = dict(model_type="gemma3_text", head_dim=256, query_pre_attn_scalar=256, rms_norm_eps=1e-6,
               rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, sliding_window_pattern=6,
               hidden_activation="gelu_pytorch_tanh", final_logit_softcapping=None, attn_logit_softcapping=None,
               pad_token_id=0, eos_token_id=1, bos_token_id=2)
_LINEAR_8 = {"factor": 8.0, "rope_type": "linear"}


def _sizes(d, f, layers, heads, kv, **more):
  return dict(hidden_size=d, intermediate_size=f, num_hidden_layers=layers, num_attention_heads=heads,
              num_key_value_heads=kv, **more)


PUBLISHED_CONFIG = {
    "gemma_2b": dict(_GEMMA1, **_sizes(2048, 16384, 18, 8, 1)),
    "gemma_7b": dict(_GEMMA1, **_sizes(3072, 24576, 28, 16, 16)),
    "gemma2_2b": dict(_GEMMA2, **_sizes(2304, 9216, 26, 8, 4, head_dim=256, query_pre_attn_scalar=256)),
    "gemma2_9b": dict(_GEMMA2, **_sizes(3584, 14336, 42, 16, 8, head_dim=256, query_pre_attn_scalar=256)),
    "gemma2_27b": dict(_GEMMA2, **_sizes(4608, 36864, 46, 32, 16, head_dim=128, query_pre_attn_scalar=144)),
    "gemma3_270m": dict(_GEMMA3, **_sizes(640, 2048, 18, 4, 1, vocab_size=262144, sliding_window=512,
                                          rope_scaling=None, max_position_embeddings=32768)),
    "gemma3_1b": dict(_GEMMA3, **_sizes(1152, 6912, 26, 4, 1, vocab_size=262144, sliding_window=512,
                                        rope_scaling=None, max_position_embeddings=32768)),
    "gemma3_4b": dict(_GEMMA3, **_sizes(2560, 10240, 34, 8, 4, vocab_size=262208, sliding_window=1024,
                                        rope_scaling=_LINEAR_8, max_position_embeddings=131072)),
    "gemma3_12b": dict(_GEMMA3, **_sizes(3840, 15360, 48, 16, 8, vocab_size=262208, sliding_window=1024,
                                         rope_scaling=_LINEAR_8, max_position_embeddings=131072)),
    "gemma3_27b": dict(_GEMMA3, **_sizes(5376, 21504, 62, 32, 16, head_dim=128, query_pre_attn_scalar=168,
                                         vocab_size=262208, sliding_window=1024, rope_scaling=_LINEAR_8,
                                         max_position_embeddings=131072)),
}


def test_every_gemma_model_file_is_checked():
  files = {f[:-4] for f in os.listdir(os.path.join(REPO, "configs", "models"))
           if f.startswith("gemma") and f.endswith(".gin")}
  assert files == set(PUBLISHED) == set(PUBLISHED_CONFIG) == set(NON_EMBEDDING)


@pytest.mark.parametrize("name", sorted(PUBLISHED_CONFIG))
def test_gin_file_says_what_the_published_config_says(name):
  """Loading the published config.json gives the gin file's config (compared as what it computes: layer types
  written out); the keys we carry without reading (max_position_embeddings, ...) are left aside."""
  loaded = gemma_config_from_hf(PUBLISHED_CONFIG[name]).replace(hf_extra_json="{}")
  assert loaded.canonical() == _config(name).canonical()

