"""T5Gemma 2 (text) against transformers' own, on tiny random models built here: logits of every head with encoder
and decoder padding, the end-of-image token, sliding windows shorter than the sequence, GQA and unequal encoder /
decoder depth; greedy and beam search token for token; scores; HF -> ours -> HF bit-identical; an encoder input
of 5000 tokens and a decoder of 5000 positions (4200 greedy steps); sharded == unsharded on four meshes."""

import json

import jax
import numpy as np
import pytest
import torch
import transformers as tf
from conftest import assert_close_to_hf, build_hf
from safetensors.numpy import load_file

import t5x_lite

V, EOI = 300, 256
SLIDING, FULL = "sliding_attention", "full_attention"


def tiny_config(**overrides) -> tf.T5Gemma2Config:
  """Encoder 4 layers, decoder 3, window 4, 4 query heads over 2 kv heads, Gemma 3's two RoPE tables (linear x8 on
  the full layers), a final soft-cap on the decoder, a 2-layer SigLIP tower without its pooling head."""
  stack = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
               head_dim=16, query_pre_attn_scalar=24, sliding_window=4, max_position_embeddings=128,
               rope_parameters={FULL: {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                                SLIDING: {"rope_type": "default", "rope_theta": 10_000.0}})
  encoder = {"text_config": {**stack, "num_hidden_layers": 4, "layer_types": [SLIDING, SLIDING, FULL, SLIDING]},
             "vision_config": {"hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 2,
                               "num_attention_heads": 4, "image_size": 32, "patch_size": 4, "vision_use_head": False},
             "mm_tokens_per_image": 16, "boi_token_index": 255, "eoi_token_index": EOI}
  decoder = {**stack, "num_hidden_layers": 3, "layer_types": [SLIDING, FULL, SLIDING], "final_logit_softcapping": 30.0}
  return tf.T5Gemma2Config(encoder=encoder, decoder=decoder, image_token_index=257, **overrides)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("t5gemma2")
  hf = build_hf(tf.T5Gemma2ForConditionalGeneration, tiny_config(), d)
  return str(d), hf


def _inputs():
  """Encoder ids (2, 10) with an eoi token, row 1 padded after 7 tokens; decoder ids (2, 7), row 1 padded."""
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 250, (2, 10))
  mask = np.ones_like(ids)
  ids[1, 7:], mask[1, 7:] = 0, 0
  ids[0, 4] = EOI
  dec = rng.integers(3, 250, (2, 7))
  dec_mask = np.ones_like(dec)
  dec[1, 5:], dec_mask[1, 5:] = 0, 0
  return ids, mask, dec, dec_mask


def _t(x):
  return torch.tensor(np.asarray(x))


def test_lm_logits_match(lm_dir):
  path, hf = lm_dir
  ids, mask, dec, dec_mask = _inputs()
  model = t5x_lite.load(path, progress=False)
  assert model.config.encoder.num_layers == 4 and model.config.decoder.num_layers == 3
  with torch.no_grad():
    ref = hf(input_ids=_t(ids), attention_mask=_t(mask), decoder_input_ids=_t(dec),
             decoder_attention_mask=_t(dec_mask)).logits.numpy()
  ours = model.logits(ids, mask, dec, dec_mask)
  real = dec_mask.astype(bool)  # padded decoder queries read nothing real: only their rows differ
  assert_close_to_hf(ours[real], ref[real])
  with torch.no_grad():
    hf_enc = hf.get_encoder()(input_ids=_t(ids), attention_mask=_t(mask)).last_hidden_state.numpy()
  assert_close_to_hf(model.encode(ids, mask)[mask.astype(bool)], hf_enc[mask.astype(bool)])


@pytest.mark.parametrize("head", ["T5Gemma2ForSequenceClassification", "T5Gemma2ForTokenClassification"])
def test_classification_heads_match(tmp_path, head):
  hf = build_hf(getattr(tf, head), tiny_config(num_labels=3), tmp_path)
  ids, mask, _, _ = _inputs()
  with torch.no_grad():
    ref = hf(input_ids=_t(ids), attention_mask=_t(mask)).logits.numpy()
  model = t5x_lite.load(str(tmp_path), progress=False)
  assert model.config.task == {"T5Gemma2ForSequenceClassification": "seq_cls",
                               "T5Gemma2ForTokenClassification": "token_cls"}[head]
  assert_close_to_hf(model.logits(ids, mask), ref)


def test_greedy_beam_and_score_match(lm_dir):
  path, hf = lm_dir
  ids, mask, _, _ = _inputs()
  model = t5x_lite.load(path, progress=False)
  with torch.no_grad():
    greedy = hf.generate(input_ids=_t(ids), attention_mask=_t(mask), max_new_tokens=12, do_sample=False).numpy()
    beam = hf.generate(input_ids=_t(ids), attention_mask=_t(mask), max_new_tokens=12, do_sample=False,
                       num_beams=3).numpy()
  assert greedy[0, 0] == 2  # transformers starts the decoder from bos (decoder_start_token_id is unset)
  np.testing.assert_array_equal(model.generate(ids, mask, max_new_tokens=12), greedy[:, 1:])
  ours_beam = model.generate(ids, mask, max_new_tokens=12, method="beam", num_beams=3)
  np.testing.assert_array_equal(ours_beam[:, :beam.shape[1] - 1], beam[:, 1:])
  targets = greedy[:, 1:6]
  with torch.no_grad():
    logits = hf(input_ids=_t(ids), attention_mask=_t(mask), labels=_t(targets)).logits.float()
  ref = torch.log_softmax(logits, -1).gather(-1, _t(targets)[..., None])[..., 0].sum(-1).numpy()
  np.testing.assert_allclose(model.score(ids, targets, mask), ref, rtol=1e-5, atol=1e-4)


def test_hf_round_trip_is_bit_identical(lm_dir, tmp_path):
  path, hf = lm_dir
  t5x_lite.load(path, progress=False).save_hf(str(tmp_path / "out"))
  before, after = load_file(f"{path}/model.safetensors"), load_file(str(tmp_path / "out" / "model.safetensors"))
  assert sorted(before) == sorted(after)
  for name, tensor in before.items():
    np.testing.assert_array_equal(after[name], tensor, err_msg=name)
  exported = json.loads((tmp_path / "out" / "config.json").read_text())
  assert exported["encoder"]["text_config"]["layer_types"] == [SLIDING, SLIDING, FULL, SLIDING]
  reloaded = tf.T5Gemma2ForConditionalGeneration.from_pretrained(str(tmp_path / "out")).eval()
  ids, mask, dec, _ = _inputs()
  with torch.no_grad():
    a = hf(input_ids=_t(ids), attention_mask=_t(mask), decoder_input_ids=_t(dec)).logits.numpy()
    b = reloaded(input_ids=_t(ids), attention_mask=_t(mask), decoder_input_ids=_t(dec)).logits.numpy()
  np.testing.assert_array_equal(a, b)


def test_encoder_input_of_5000_tokens(lm_dir):
  """Far beyond the window (4) and beyond 4096: forward logits match, and greedy decoding from it too."""
  path, hf = lm_dir
  rng = np.random.default_rng(5)
  ids = rng.integers(3, 250, (1, 5000))
  mask = np.ones_like(ids)
  dec = rng.integers(3, 250, (1, 4))
  model = t5x_lite.load(path, progress=False)
  with torch.no_grad():
    ref = hf(input_ids=_t(ids), attention_mask=_t(mask), decoder_input_ids=_t(dec)).logits.numpy()
    greedy = hf.generate(input_ids=_t(ids), attention_mask=_t(mask), max_new_tokens=6, do_sample=False).numpy()
  assert_close_to_hf(model.logits(ids, mask, dec), ref)
  np.testing.assert_array_equal(model.generate(ids, mask, max_new_tokens=6), greedy[:, 1:])


def test_decoder_of_5000_positions(lm_dir):
  """The decoder side beyond 4096: 5000 decoder inputs give transformers' logits, and 4200 greedy steps through
  the static self-attention cache (ring buffers in the sliding layers) give its tokens."""
  path, hf = lm_dir
  rng = np.random.default_rng(6)
  ids = rng.integers(3, 250, (1, 12))
  mask = np.ones_like(ids)
  dec = rng.integers(3, 250, (1, 5000))
  model = t5x_lite.load(path, progress=False)
  with torch.no_grad():
    ref = hf(input_ids=_t(ids), attention_mask=_t(mask), decoder_input_ids=_t(dec)).logits.numpy()
    greedy = hf.generate(input_ids=_t(ids), attention_mask=_t(mask), max_new_tokens=4200, do_sample=False).numpy()
  assert_close_to_hf(model.logits(ids, mask, dec), ref)
  assert greedy.shape == (1, 4201)
  np.testing.assert_array_equal(model.generate(ids, mask, max_new_tokens=4200), greedy[:, 1:])


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (XLA_FLAGS host device count)")
@pytest.mark.parametrize("spec", ["data:2,fsdp:2,tensor:2", "tensor:8", "fsdp:8", "data:4,tensor:2"])
def test_sharded_equals_unsharded(lm_dir, spec):
  """4 heads and 2 kv heads do not divide tensor:8 (replicated there), the vocabulary 300 not 8."""
  path, _ = lm_dir
  ids, mask, dec, _ = _inputs()
  ids, mask, dec = (np.concatenate([x, x[::-1]]) for x in (ids, mask, dec))
  single = t5x_lite.load(path, progress=False)
  sharded = t5x_lite.load(path, mesh=t5x_lite.make_mesh(spec), progress=False)
  want = single.logits(ids, mask, dec)
  np.testing.assert_allclose(sharded.logits(ids, mask, dec), want, rtol=0, atol=5e-6 * float(np.abs(want).max()))
  np.testing.assert_array_equal(sharded.generate(ids, mask, max_new_tokens=6),
                                single.generate(ids, mask, max_new_tokens=6))
