"""T5Gemma 2's published shapes (configs/models/t5gemma2_*.gin): our param count equals transformers' count of the
exported config on the meta device (nothing allocated) and the published totals; the 270M-270M file says what the
published config.json says. Sources of every figure: the comments at the top of each gin file."""

import os

import gin
import pytest
import torch
import transformers as tf

from t5x_lite.config import T5Gemma2Config, t5gemma2_config_from_hf, t5gemma2_config_to_hf  # registers configurables
from t5x_lite.models.params import count_params
from t5x_lite.models.registry import family_of_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ("t5gemma2_270m_270m", "t5gemma2_1b_1b", "t5gemma2_4b_4b")

# Our count, which must also be transformers' (T5Gemma2ForConditionalGeneration.num_parameters(): one tied V x D
# table, one eoi vector, both stacks, the SigLIP tower and the projector).
TOTAL = {"t5gemma2_270m_270m": 786_029_296, "t5gemma2_1b_1b": 2_115_977_456, "t5gemma2_4b_4b": 7_508_928_880}

# keras-hub's exact preset counts (keras_hub/src/models/t5gemma2/t5gemma2_presets.py), converted from the google/
# checkpoints. keras-hub keeps two V x D tables (encoder, decoder) and one eoi vector per stack, so its count is
# transformers' + V*D + D; before keras-hub #2709 its eoi vectors were untracked and it counted + V*D - D. The
# 270M-270M and 1B-1B figures are of the second kind, the 4B-4B one of the first (each other reading would need a
# vocabulary of 262143 or 262145, the family's tokenizer has 262144).
KERAS_HUB = {"t5gemma2_270m_270m": (953_800_816, -1), "t5gemma2_1b_1b": (2_417_966_192, -1),
             "t5gemma2_4b_4b": (8_180_020_080, +1)}

# Google's announcement gives totals excluding the vision encoder, rounded (~370M, ~1.7B, ~7B), the paper a 417M
# vision encoder: the tolerance is half a unit of the last stated digit. We leave out the tower and the projector
# (with the projector the totals round the same). "270M-270M" and the like are labels (per stack, after the Gemma 3
# model each stack comes from), not totals.
WITHOUT_VISION = {"t5gemma2_270m_270m": (370e6, 5e6), "t5gemma2_1b_1b": (1.7e9, 0.05e9), "t5gemma2_4b_4b": (7e9, 0.5e9)}
VISION_ENCODER = (417e6, 0.5e6)


def _config(name) -> T5Gemma2Config:
  gin.clear_config()
  try:
    gin.parse_config_file(os.path.join(REPO, "configs", "models", f"{name}.gin"))
    for stack in ("encoder", "decoder"):  # each stack its own scope, so the two may differ
      assert gin.query_parameter(f"T5Gemma2Config.{stack}").scoped_selector == f"t5gemma2_{stack}/GemmaConfig"
    return T5Gemma2Config()
  finally:
    gin.clear_config()


def _specs(config):
  return family_of_config(config).param_specs(config)


@pytest.mark.parametrize("name", NAMES)
def test_param_count_equals_transformers(name):
  config = _config(name)
  ours = count_params(_specs(config))
  hf_config = tf.T5Gemma2Config.from_dict(t5gemma2_config_to_hf(config))
  with torch.device("meta"):  # shapes only
    theirs = tf.T5Gemma2ForConditionalGeneration(hf_config).num_parameters()
  assert ours == theirs == TOTAL[name]


@pytest.mark.parametrize("name", NAMES)
def test_param_count_equals_published_totals(name):
  config = _config(name)
  specs = _specs(config)
  total, vision, projector = count_params(specs), count_params(specs["vision"]), count_params(specs["projector"])
  keras_count, eoi_sign = KERAS_HUB[name]
  assert total == keras_count - config.vocab_size * config.d_model - eoi_sign * config.d_model
  stated, tolerance = WITHOUT_VISION[name]
  assert abs(total - vision - projector - stated) <= tolerance
  assert abs(vision - VISION_ENCODER[0]) <= VISION_ENCODER[1]


# google/t5gemma-2-270m-270m's config as transformers loaded it (the printout named in t5gemma2_270m_270m.gin):
# the fields that shape or drive the model.
PUBLISHED_270M_STACK = dict(
    vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
    num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512, rms_norm_eps=1e-6,
    max_position_embeddings=32768, hidden_activation="gelu_pytorch_tanh", final_logit_softcapping=None,
    attention_bias=False,
    layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3,
    rope_parameters={"full_attention": {"factor": 8.0, "rope_theta": 1000000, "rope_type": "linear"},
                     "sliding_attention": {"rope_theta": 10000, "rope_type": "default"}})
PUBLISHED_270M_VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                             num_channels=3, image_size=896, patch_size=14, layer_norm_eps=1e-6,
                             hidden_act="gelu_pytorch_tanh", vision_use_head=False)
PUBLISHED_270M_TOP = dict(image_token_index=256001, eoi_token_index=256000, pad_token_id=0, eos_token_id=1,
                          bos_token_id=2, vocab_size=262144)
PUBLISHED_270M_ENCODER = dict(mm_tokens_per_image=256, boi_token_index=255999, eoi_token_index=256000,
                              image_token_index=256001)


def test_270m_exports_the_published_config():
  config = _config("t5gemma2_270m_270m")
  hf = tf.T5Gemma2Config.from_dict(t5gemma2_config_to_hf(config))
  for stack in (hf.encoder.text_config, hf.decoder):
    assert {k: getattr(stack, k) for k in PUBLISHED_270M_STACK} == PUBLISHED_270M_STACK
  assert {k: getattr(hf.encoder.vision_config, k) for k in PUBLISHED_270M_VISION} == PUBLISHED_270M_VISION
  assert {k: getattr(hf.encoder, k) for k in PUBLISHED_270M_ENCODER} == PUBLISHED_270M_ENCODER
  assert {k: getattr(hf, k) for k in PUBLISHED_270M_TOP} == PUBLISHED_270M_TOP


@pytest.mark.parametrize("name", NAMES)
def test_gin_config_reads_back_from_its_export(name):
  config = _config(name)
  back = t5gemma2_config_from_hf(t5gemma2_config_to_hf(config))
  assert back.canonical().replace(hf_extra_json="{}", encoder_hf_extra_json="{}") == \
      config.canonical().replace(hf_extra_json="{}", encoder_hf_extra_json="{}")
