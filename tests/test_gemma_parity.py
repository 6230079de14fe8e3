"""Logit parity with transformers for Gemma 1 / 2 / 3 (text), on tiny random models built in the test."""

import numpy as np
import pytest
import torch
import transformers as tf
from conftest import assert_close_to_hf, build_hf

import t5x_lite


# The tiny shapes of ../shared/reference/tiny_configs, written out so the tests stand alone. Deliberate
# quirks: MQA (Gemma 1), sliding window 4 < sequence 12, soft-caps on (Gemma 2), query_pre_attn_scalar 24
# != head_dim 16, Gemma 3's 5 sliding + 1 full layers with linear RoPE scaling on the full one.
COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4, head_dim=16,
              max_position_embeddings=128)
GENERATIONS = {
    "gemma_mqa": (tf.GemmaConfig, dict(num_hidden_layers=2, num_key_value_heads=1)),
    "gemma_mha": (tf.GemmaConfig, dict(num_hidden_layers=2, num_key_value_heads=4)),
    "gemma2": (tf.Gemma2Config, dict(num_hidden_layers=3, num_key_value_heads=2, query_pre_attn_scalar=24,
                                     sliding_window=4, final_logit_softcapping=30.0, attn_logit_softcapping=50.0)),
    "gemma3_text": (tf.Gemma3TextConfig, dict(
        num_hidden_layers=6, num_key_value_heads=2, query_pre_attn_scalar=24, sliding_window=4,
        final_logit_softcapping=5.0,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})),
}
CAUSAL_LM = {tf.GemmaConfig: tf.GemmaForCausalLM, tf.Gemma2Config: tf.Gemma2ForCausalLM,
             tf.Gemma3TextConfig: tf.Gemma3ForCausalLM}
SEQ_CLS = {tf.GemmaConfig: tf.GemmaForSequenceClassification, tf.Gemma2Config: tf.Gemma2ForSequenceClassification,
           tf.Gemma3TextConfig: tf.Gemma3TextForSequenceClassification}
TOKEN_CLS = {tf.GemmaConfig: tf.GemmaForTokenClassification, tf.Gemma2Config: tf.Gemma2ForTokenClassification}


def make_config(name, **extra):
  config_cls, kwargs = GENERATIONS[name]
  return config_cls(**COMMON, **kwargs, **extra)


@pytest.fixture
def left_padded():
  """(3, 12) ids; row 1 has 3 left pads, row 2 has 8 (more than the window)."""
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 128, (3, 12))
  mask = np.ones_like(ids)
  mask[1, :3] = 0
  mask[2, :8] = 0
  ids[mask == 0] = 0
  return ids, mask


def _hf_out(model, ids, mask):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


@pytest.mark.parametrize("name", sorted(GENERATIONS))
def test_causal_lm_logits(name, tmp_path, left_padded):
  config = make_config(name)
  hf = build_hf(CAUSAL_LM[type(config)], config, tmp_path)
  ids, mask = left_padded
  ref = _hf_out(hf, ids, mask)
  model = t5x_lite.load(str(tmp_path), progress=False)
  ours = model.logits(ids, mask)
  valid = mask.astype(bool)  # pad query rows are undefined in transformers (eager vs sdpa differ)
  assert_close_to_hf(ours[valid], ref[valid])
  # Without padding, every row.
  assert_close_to_hf(model.logits(ids[:1]), _hf_out(hf, ids[:1], np.ones_like(ids[:1])))


def test_gemma3_bidirectional(tmp_path, left_padded):
  config = make_config("gemma3_text", use_bidirectional_attention=True)
  hf = build_hf(tf.Gemma3ForCausalLM, config, tmp_path)
  ids, mask = left_padded
  model = t5x_lite.load(str(tmp_path), progress=False)
  assert model.config.bidirectional and model.config.sliding_window == 4
  valid = mask.astype(bool)
  assert_close_to_hf(model.logits(ids, mask)[valid], _hf_out(hf, ids, mask)[valid])


def test_gemma3_multimodal_text_part(tmp_path, left_padded):
  """A `gemma3` (Gemma3ForConditionalGeneration) checkpoint: we load its language model, text in, text out."""
  text = make_config("gemma3_text")
  vision = tf.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=16, patch_size=4)
  config = tf.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                           image_token_index=127, boi_token_index=125, eoi_token_index=126)
  hf = build_hf(tf.Gemma3ForConditionalGeneration, config, tmp_path)
  ids, mask = left_padded
  model = t5x_lite.load(str(tmp_path), progress=False)
  assert model.config.model_type == "gemma3"
  valid = mask.astype(bool)
  assert_close_to_hf(model.logits(ids, mask)[valid], _hf_out(hf, ids, mask)[valid])
  # Exported as the text-only model, with the same logits.
  model.save_hf(str(tmp_path / "text_only"))
  back = tf.Gemma3ForCausalLM.from_pretrained(tmp_path / "text_only").eval()
  assert_close_to_hf(_hf_out(back, ids, mask)[valid], _hf_out(hf, ids, mask)[valid], rtol=1e-6)


@pytest.mark.parametrize("name", ["gemma_mqa", "gemma2", "gemma3_text"])
def test_sequence_classification(name, tmp_path, left_padded):
  config = make_config(name, num_labels=3, pad_token_id=0)
  hf = build_hf(SEQ_CLS[type(config)], config, tmp_path)
  ids, mask = left_padded
  ids = np.concatenate([ids, np.zeros((3, 2), ids.dtype)], axis=1)  # right padding too: pooling must skip it
  mask = np.concatenate([mask, np.zeros((3, 2), mask.dtype)], axis=1)
  model = t5x_lite.load(str(tmp_path), progress=False)
  assert model.config.task == "seq_cls"
  assert_close_to_hf(model.logits(ids, mask), _hf_out(hf, ids, mask))


@pytest.mark.parametrize("name", ["gemma_mqa", "gemma2"])
def test_token_classification(name, tmp_path, left_padded):
  config = make_config(name, num_labels=5)
  hf = build_hf(TOKEN_CLS[type(config)], config, tmp_path)
  ids, mask = left_padded
  model = t5x_lite.load(str(tmp_path), progress=False)
  valid = mask.astype(bool)
  assert_close_to_hf(model.logits(ids, mask)[valid], _hf_out(hf, ids, mask)[valid])


@pytest.mark.parametrize("name,cls_map", [("gemma_mqa", CAUSAL_LM), ("gemma2", CAUSAL_LM),
                                          ("gemma3_text", CAUSAL_LM), ("gemma2", SEQ_CLS), ("gemma_mqa", TOKEN_CLS)])
def test_round_trip_through_transformers(name, cls_map, tmp_path, left_padded):
  config = make_config(name, num_labels=3)
  cls = cls_map[type(config)]
  hf = build_hf(cls, config, tmp_path / "hf")
  ids, mask = left_padded
  model = t5x_lite.load(str(tmp_path / "hf"), progress=False)
  model.save_hf(str(tmp_path / "export"))
  back = cls.from_pretrained(tmp_path / "export").eval()
  np.testing.assert_array_equal(_hf_out(back, ids, mask), _hf_out(hf, ids, mask))


def test_untied_lm_head(tmp_path, left_padded):
  config = make_config("gemma2", tie_word_embeddings=False)
  hf = build_hf(tf.Gemma2ForCausalLM, config, tmp_path)
  ids, mask = left_padded
  model = t5x_lite.load(str(tmp_path), progress=False)
  assert not model.config.tie_lm_head
  valid = mask.astype(bool)
  assert_close_to_hf(model.logits(ids, mask)[valid], _hf_out(hf, ids, mask)[valid])


def test_bfloat16(tmp_path, left_padded):
  config = make_config("gemma3_text")
  hf = build_hf(tf.Gemma3ForCausalLM, config, tmp_path)
  ids, mask = left_padded
  model = t5x_lite.load(str(tmp_path), dtype="bfloat16", progress=False)
  valid = mask.astype(bool)
  assert_close_to_hf(model.logits(ids, mask)[valid], _hf_out(hf, ids, mask)[valid], rtol=3e-2)
