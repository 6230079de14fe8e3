"""Configs from gin files and from transformers config.json; param counts without allocating."""

import os

import gin
import pytest
import torch
import transformers as tf

from t5x_lite.config import T5Config, t5_config_from_hf, t5_config_to_hf
from t5x_lite.models import t5
from t5x_lite.models.params import count_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# gin file -> the transformers config of the published checkpoint with that shape
PUBLISHED = {
    "t5_small.gin": dict(d_model=512, d_ff=2048, num_layers=6, num_heads=8, feed_forward_proj="relu"),
    "t5_1_1_small.gin": dict(d_model=512, d_ff=1024, num_layers=8, num_heads=6, feed_forward_proj="gated-gelu",
                             tie_word_embeddings=False),
    "t5_1_1_base.gin": dict(d_model=768, d_ff=2048, num_layers=12, num_heads=12, feed_forward_proj="gated-gelu",
                            tie_word_embeddings=False),
}


@pytest.mark.parametrize("gin_file", sorted(PUBLISHED))
def test_gin_shapes_count_like_transformers(gin_file):
  gin.clear_config()
  gin.parse_config_file(os.path.join(REPO, "configs", "models", gin_file))
  config = T5Config()
  gin.clear_config()
  hf_config = tf.T5Config(vocab_size=32128, d_kv=64, decoder_start_token_id=0, **PUBLISHED[gin_file])
  with torch.device("meta"):  # shapes only, nothing allocated
    hf_model = tf.T5ForConditionalGeneration(hf_config)
  if not config.tie_lm_head:  # released v1.1 checkpoints carry a separate lm_head
    expected = hf_model.num_parameters() + 32128 * config.d_model
  else:
    expected = hf_model.num_parameters()
  assert count_params(t5.param_specs(config)) == expected


def test_hf_config_round_trip_keeps_unknown_keys():
  hf = tf.T5Config(vocab_size=100, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
                   decoder_start_token_id=0, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                   task_specific_params={"summarization": {"prefix": "summarize: "}}).to_dict()
  hf["architectures"] = ["T5ForConditionalGeneration"]
  config = t5_config_from_hf(hf)
  assert (config.mlp_gated, config.mlp_activation, config.scale_decoder_outputs) == (True, "gelu_tanh", False)
  back = t5_config_to_hf(config)
  assert back["task_specific_params"] == {"summarization": {"prefix": "summarize: "}}
  again = tf.T5Config.from_dict(back)
  assert again.scale_decoder_outputs is False and again.is_gated_act and again.d_ff == 32
