"""Param counts of the published Gemma shapes (configs/models/*.gin), computed with jax.eval_shape (nothing
allocated), against the published totals and transformers' count of the same config on the meta device."""

import math
import os

import gin
import jax
import pytest
import torch
import transformers as tf

from t5x_lite.config import GemmaConfig
from t5x_lite.models import gemma
from t5x_lite.models.params import init_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Published parameter totals (text model, tied embedding counted once).
PUBLISHED = {
    "gemma_2b": 2_506_172_416, "gemma_7b": 8_537_680_896,
    "gemma2_2b": 2_614_341_888, "gemma2_9b": 9_241_705_984, "gemma2_27b": 27_227_128_320,
    "gemma3_270m": 268_098_176, "gemma3_1b": 999_885_952, "gemma3_4b": 3_880_263_168,
    "gemma3_12b": 11_766_034_176,
    "gemma3_27b": 27_009_346_304,  # the text part of the 27B release (its vision tower is not counted)
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
