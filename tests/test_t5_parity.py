"""Logit parity with transformers for the T5 family, on tiny random models built in the test."""

import jax
import numpy as np
import pytest
import torch
import transformers as tf
from conftest import T5_TINY, assert_close_to_hf, build_hf, untie_lm_head

import t5x_lite

VARIANTS = {
    # name: (config class, model class, config overrides)
    "t5_relu_tied": (tf.T5Config, tf.T5ForConditionalGeneration, dict(feed_forward_proj="relu")),
    "t5v1_1_gated_untied": (tf.T5Config, tf.T5ForConditionalGeneration,
                            dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
    "mt5": (tf.MT5Config, tf.MT5ForConditionalGeneration, dict(feed_forward_proj="gated-gelu")),
    "umt5": (tf.UMT5Config, tf.UMT5ForConditionalGeneration, dict(feed_forward_proj="gated-gelu")),
}


def _torch(*arrays):
  return [None if a is None else torch.tensor(np.asarray(a)) for a in arrays]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_conditional_generation_logits(name, tmp_path, batch):
  config_cls, model_cls, overrides = VARIANTS[name]
  hf = build_hf(model_cls, config_cls(**T5_TINY, **overrides), tmp_path)
  if "untied" in name:
    hf = untie_lm_head(model_cls, tmp_path)
  ids, mask, dec = batch
  dec_mask = np.ones_like(dec)
  dec_mask[0, 5:] = 0  # decoder padding too
  ti, tm, td, tdm = _torch(ids, mask, dec, dec_mask)
  with torch.no_grad():
    ref = hf(input_ids=ti, attention_mask=tm, decoder_input_ids=td, decoder_attention_mask=tdm).logits.numpy()
  model = t5x_lite.load(str(tmp_path), progress=False)
  assert model.config.model_type == name.split("_")[0].replace("t5v1", "t5")
  ours = model.logits(ids, mask, dec, dec_mask)
  # Decoder rows at padded positions are still defined (causal keys before them are real); compare all.
  assert_close_to_hf(ours, ref)
  # The encoder alone matches too.
  with torch.no_grad():
    ref_enc = hf.get_encoder()(input_ids=ti, attention_mask=tm).last_hidden_state.numpy()
  valid = mask.astype(bool)
  assert_close_to_hf(model.encode(ids, mask)[valid], ref_enc[valid])


def test_tied_and_untied_heads_are_detected(tmp_path):
  build_hf(tf.T5ForConditionalGeneration, tf.T5Config(**T5_TINY), tmp_path / "tied")
  build_hf(tf.T5ForConditionalGeneration, tf.T5Config(**T5_TINY, tie_word_embeddings=False), tmp_path / "untied")
  untie_lm_head(tf.T5ForConditionalGeneration, tmp_path / "untied")
  a = t5x_lite.load(str(tmp_path / "tied"), progress=False).config
  b = t5x_lite.load(str(tmp_path / "untied"), progress=False).config
  assert (a.tie_lm_head, a.scale_decoder_outputs) == (True, True)
  assert (b.tie_lm_head, b.scale_decoder_outputs) == (False, False)


def test_encoder_model(tmp_path, batch):
  hf = build_hf(tf.T5EncoderModel, tf.T5Config(**T5_TINY, feed_forward_proj="gated-gelu"), tmp_path)
  ids, mask, _ = batch
  ti, tm = _torch(ids, mask)
  with torch.no_grad():
    ref = hf(input_ids=ti, attention_mask=tm).last_hidden_state.numpy()
  model = t5x_lite.load(str(tmp_path), progress=False)
  assert model.config.task == "encoder"
  valid = mask.astype(bool)
  assert_close_to_hf(model.encode(ids, mask)[valid], ref[valid])
  with pytest.raises(ValueError, match="encoder-only"):
    model.logits(ids, mask)


def test_sequence_classification(tmp_path, batch):
  hf = build_hf(tf.T5ForSequenceClassification, tf.T5Config(**T5_TINY, num_labels=3), tmp_path)
  ids, mask, _ = batch
  ids = ids.copy()
  ids[0, 9] = 1  # one EOS per row, at different places
  ids[1, 6] = 1
  ti, tm = _torch(ids, mask)
  with torch.no_grad():
    ref = hf(input_ids=ti, attention_mask=tm).logits.numpy()
  model = t5x_lite.load(str(tmp_path), progress=False)
  assert model.config.task == "seq_cls"
  assert_close_to_hf(model.logits(ids, mask), ref)
  ids[1, 6] = 5
  with pytest.raises(ValueError, match="row 1 of input_ids has none"):
    model.logits(ids, mask)


def test_token_classification(tmp_path, batch):
  hf = build_hf(tf.T5ForTokenClassification, tf.T5Config(**T5_TINY, num_labels=5), tmp_path)
  ids, mask, _ = batch
  ti, tm = _torch(ids, mask)
  with torch.no_grad():
    ref = hf(input_ids=ti, attention_mask=tm).logits.numpy()
  model = t5x_lite.load(str(tmp_path), progress=False)
  valid = mask.astype(bool)
  assert_close_to_hf(model.logits(ids, mask)[valid], ref[valid])


def test_question_answering(tmp_path, batch):
  hf = build_hf(tf.T5ForQuestionAnswering, tf.T5Config(**T5_TINY), tmp_path)
  ids, mask, _ = batch
  ti, tm = _torch(ids, mask)
  with torch.no_grad():
    out = hf(input_ids=ti, attention_mask=tm)
  ref = np.stack([out.start_logits.numpy(), out.end_logits.numpy()], axis=-1)
  model = t5x_lite.load(str(tmp_path), progress=False)
  assert_close_to_hf(model.logits(ids, mask), ref)


def test_bfloat16_compute(tmp_path, batch):
  """bfloat16 compute (float32 params) stays within 2% of the logit scale of HF float32."""
  build_hf(tf.T5ForConditionalGeneration, tf.T5Config(**T5_TINY, feed_forward_proj="gated-gelu",
                                                     tie_word_embeddings=False), tmp_path)
  hf = untie_lm_head(tf.T5ForConditionalGeneration, tmp_path)
  ids, mask, dec = batch
  ti, tm, td = _torch(ids, mask, dec)
  with torch.no_grad():
    ref = hf(input_ids=ti, attention_mask=tm, decoder_input_ids=td).logits.numpy()
  model = t5x_lite.load(str(tmp_path), dtype="bfloat16", param_dtype="float32", progress=False)
  ours = model.logits(ids, mask, dec)
  assert_close_to_hf(ours, ref, rtol=2e-2)
  # and bfloat16 params too
  model16 = t5x_lite.load(str(tmp_path), dtype="bfloat16", progress=False)
  assert model16.params["embed"]["embedding"].dtype == np.dtype("bfloat16") or \
      str(model16.params["embed"]["embedding"].dtype) == "bfloat16"
  assert_close_to_hf(model16.logits(ids, mask, dec), ref, rtol=3e-2)


def test_input_mistakes_raise_naming_the_argument(tmp_path, batch):
  build_hf(tf.T5ForConditionalGeneration, tf.T5Config(**T5_TINY), tmp_path)
  n = len(jax.devices())
  meshed = t5x_lite.load(str(tmp_path), mesh=f"data:{n}", progress=False)  # a spec string is made into a mesh
  assert dict(meshed.mesh.shape)["data"] == n
  model = t5x_lite.load(str(tmp_path), progress=False)
  ids, mask, dec = batch
  with pytest.raises(ValueError, match=r"decoder_input_ids has 1 rows but input_ids has 2"):
    model.logits(ids, mask, dec[:1])
  with pytest.raises(ValueError, match=r"input_ids is empty, shape \(1, 0\)"):
    model.encode(np.zeros((1, 0), np.int32))
  with pytest.raises(ValueError, match=r"input_ids is empty, shape \(0, 4\)"):
    model.generate(np.zeros((0, 4), np.int32), max_new_tokens=2)
  for kwargs, message in [(dict(method="sample", temperature=float("inf")), "temperature must be finite and > 0"),
                          (dict(method="beam", length_penalty=float("nan")), "length_penalty must be finite"),
                          (dict(seed=2 ** 70), "seed must be an integer that fits in int64"),
                          (dict(top_p=0.0), "0 < top_p <= 1")]:
    with pytest.raises(ValueError, match=message):
      model.generate(ids, mask, max_new_tokens=2, **kwargs)
  with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh, a spec string"):
    t5x_lite.load(str(tmp_path), mesh=5, progress=False)
