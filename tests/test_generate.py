"""Generation and scoring against transformers: greedy token for token, sampling by distribution and seed,
sharded equals single-device, and bounded compilation under shape bucketing."""

import logging

import jax
import numpy as np
import pytest
import torch
import transformers as tf
from conftest import T5_TINY, build_hf

import t5x_lite
from t5x_lite.decoding.sampling import choose_tokens, filter_logits

GEMMA_COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4, head_dim=16,
                    max_position_embeddings=256)
DECODER_ONLY = {
    "gemma": (tf.GemmaForCausalLM, tf.GemmaConfig(**GEMMA_COMMON, num_hidden_layers=2, num_key_value_heads=1)),
    "gemma2": (tf.Gemma2ForCausalLM, tf.Gemma2Config(**GEMMA_COMMON, num_hidden_layers=3, num_key_value_heads=2,
                                                     query_pre_attn_scalar=24, sliding_window=4,
                                                     final_logit_softcapping=30.0, attn_logit_softcapping=50.0)),
    "gemma3": (tf.Gemma3ForCausalLM, tf.Gemma3TextConfig(**GEMMA_COMMON, num_hidden_layers=8, num_key_value_heads=2,
                                                         query_pre_attn_scalar=24, sliding_window=5)),
}


def _with_eos_from_greedy(hf, tmp_path, generate_kwargs, strip, row=0, at=4):
  """Re-saves `hf` with an EOS id its greedy output actually produces (so early stopping is exercised)."""
  with torch.no_grad():
    out = hf.generate(**generate_kwargs, do_sample=False, max_new_tokens=12).numpy()[:, strip:]
  eos = int(out[row, at])
  hf.config.eos_token_id = eos
  hf.generation_config.eos_token_id = eos
  hf.save_pretrained(tmp_path)
  return eos


def _left_padded(rng, batch, length, pads):
  ids = rng.integers(3, 128, (batch, length))
  mask = np.ones_like(ids)
  for row, n in enumerate(pads):
    mask[row, :n] = 0
  ids[mask == 0] = 0
  return ids, mask


@pytest.mark.parametrize("name", sorted(DECODER_ONLY))
def test_decoder_only_greedy_equals_transformers(name, tmp_path):
  model_cls, config = DECODER_ONLY[name]
  hf = build_hf(model_cls, config, tmp_path, seed=1)
  with torch.no_grad():
    for p in hf.parameters():
      p.mul_(4.0)  # peakier distributions: fewer near-ties, varied tokens
  ids, mask = _left_padded(np.random.default_rng(0), 3, 9, [0, 3, 7])
  kwargs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
  eos = _with_eos_from_greedy(hf, tmp_path, kwargs, strip=9)
  with torch.no_grad():
    ref = hf.generate(**kwargs, do_sample=False, max_new_tokens=20, pad_token_id=0).numpy()[:, 9:]
  model = t5x_lite.load(str(tmp_path), progress=False)
  assert model.config.eos_token_id == eos
  ours = model.generate(ids, mask, max_new_tokens=20)
  # transformers stops the whole batch once all rows are done; we always return max_new_tokens columns.
  np.testing.assert_array_equal(ours[:, :ref.shape[1]], ref)
  assert (ours[:, ref.shape[1]:] == 0).all()
  assert (ref == eos).any()  # early stopping was exercised


def _hf_greedy_no_cache(hf, ids, mask, steps, start, eos, pad):
  """transformers' forward, one full pass per token (no cache): the reference where its generate crashes."""
  dec = np.full((ids.shape[0], 1), start)
  done = np.zeros(ids.shape[0], bool)
  out = []
  with torch.no_grad():
    for _ in range(steps):
      logits = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                  decoder_input_ids=torch.tensor(dec), use_cache=False).logits.numpy()[:, -1]
      tok = np.where(done, pad, logits.argmax(-1))
      done |= tok == eos
      out.append(tok)
      dec = np.concatenate([dec, tok[:, None]], axis=1)
  return np.stack(out, axis=1)


@pytest.mark.parametrize("variant", ["t5_relu", "t5v1_1", "mt5", "umt5", "unequal_depth"])
def test_encoder_decoder_greedy_equals_transformers(variant, tmp_path):
  cfg_cls, model_cls, extra = {
      "t5_relu": (tf.T5Config, tf.T5ForConditionalGeneration, {}),
      "t5v1_1": (tf.T5Config, tf.T5ForConditionalGeneration, dict(feed_forward_proj="gated-gelu")),
      "mt5": (tf.MT5Config, tf.MT5ForConditionalGeneration, dict(feed_forward_proj="gated-gelu")),
      "umt5": (tf.UMT5Config, tf.UMT5ForConditionalGeneration, dict(feed_forward_proj="gated-gelu")),
      "unequal_depth": (tf.T5Config, tf.T5ForConditionalGeneration, {}),
  }[variant]
  kwargs = {**T5_TINY, **extra}
  if variant != "unequal_depth":
    kwargs["num_decoder_layers"] = kwargs["num_layers"]  # transformers' T5 generate crashes otherwise
  hf = build_hf(model_cls, cfg_cls(**kwargs), tmp_path, seed=2)
  with torch.no_grad():
    for p in hf.parameters():
      p.mul_(3.0)
  rng = np.random.default_rng(1)
  ids = rng.integers(3, 128, (3, 10))
  mask = np.ones_like(ids)
  mask[1, 6:] = 0
  ids[1, 6:] = 0
  model = t5x_lite.load(str(tmp_path), progress=False)  # (weights as saved before the *3; reload below)
  hf.save_pretrained(tmp_path)
  model = t5x_lite.load(str(tmp_path), progress=False)
  if variant == "unequal_depth":
    ref = _hf_greedy_no_cache(hf, ids, mask, 16, 0, model.config.eos_token_id, 0)
    ours = model.generate(ids, mask, max_new_tokens=16)
    np.testing.assert_array_equal(ours, ref)
    return
  gen = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
  eos = _with_eos_from_greedy(hf, tmp_path, gen, strip=1, at=3)
  model = t5x_lite.load(str(tmp_path), progress=False)
  with torch.no_grad():
    ref = hf.generate(**gen, do_sample=False, max_new_tokens=16).numpy()[:, 1:]
  ours = model.generate(ids, mask, max_new_tokens=16)
  np.testing.assert_array_equal(ours[:, :ref.shape[1]], ref)
  assert (ref == eos).any()


def test_long_generation_wraps_the_sliding_ring_buffer(tmp_path):
  """Gemma 3 with window 5: prompt 9 and 40 new tokens walk the ring buffer around many times."""
  model_cls, config = DECODER_ONLY["gemma3"]
  hf = build_hf(model_cls, config, tmp_path, seed=3)
  with torch.no_grad():
    for p in hf.parameters():
      p.mul_(4.0)
  hf.save_pretrained(tmp_path)
  ids, mask = _left_padded(np.random.default_rng(5), 2, 9, [0, 2])
  with torch.no_grad():
    ref = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                      max_new_tokens=40, eos_token_id=None, pad_token_id=0).numpy()[:, 9:]
  ours = t5x_lite.load(str(tmp_path), progress=False).generate(ids, mask, max_new_tokens=40)
  np.testing.assert_array_equal(ours, ref)


# ------------------------------------------------------------------------------------------- sampling

def test_filters_equal_transformers_warpers():
  rng = np.random.default_rng(0)
  plain = rng.normal(size=(64, 50)).astype(np.float32) * 3
  tied = plain.copy()
  tied[:, 10] = tied[:, 11]  # top-k keeps every token tied with the k-th (defined in transformers)
  # Exact ties at the top-p boundary are left out: which tied token torch's (unstable) sort drops is unspecified.
  for temperature, top_k, top_p in [(1.0, 5, 1.0), (0.7, 0, 0.8), (1.3, 10, 0.5), (1.0, 0, 0.95), (2.0, 3, 0.3),
                                    (1.0, 11, 1.0)]:
    logits = tied if top_p == 1.0 else plain
    warpers = tf.LogitsProcessorList()
    if temperature != 1.0:
      warpers.append(tf.TemperatureLogitsWarper(temperature))
    if top_k:
      warpers.append(tf.TopKLogitsWarper(top_k))
    if top_p < 1.0:
      warpers.append(tf.TopPLogitsWarper(top_p))
    ref = warpers(None, torch.tensor(logits)).numpy()
    ours = np.asarray(filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p))
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    np.testing.assert_allclose(ours[~np.isinf(ours)], ref[~np.isinf(ref)], rtol=1e-6)


def test_sampling_frequencies_follow_the_filtered_distribution():
  """Chi-square goodness of fit of 40k draws against softmax(filtered logits)."""
  rng = np.random.default_rng(1)
  logits = np.tile(rng.normal(size=(1, 12)).astype(np.float32) * 1.5, (40_000, 1))
  draws = np.asarray(choose_tokens(logits, jax.random.key(3), method="sample", temperature=0.8, top_k=8,
                                   top_p=0.9))
  filtered = np.asarray(filter_logits(logits[:1], temperature=0.8, top_k=8, top_p=0.9))[0]
  probs = np.exp(filtered - filtered.max())
  probs /= probs.sum()
  counts = np.bincount(draws, minlength=12)
  assert counts[probs == 0].sum() == 0  # nothing outside the filter, ever
  keep = probs > 0
  expected = probs[keep] * len(draws)
  chi2 = float((((counts[keep] - expected) ** 2) / expected).sum())
  # 99.9% quantile of chi-square with (kept - 1) <= 7 degrees of freedom is 24.3.
  assert chi2 < 24.3, (chi2, counts, expected)


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("gemma2")
  build_hf(*DECODER_ONLY["gemma2"], d, seed=4)
  return str(d)


def test_sampling_is_reproducible_and_row_independent(gemma_dir):
  model = t5x_lite.load(gemma_dir, progress=False)
  ids, mask = _left_padded(np.random.default_rng(2), 3, 7, [0, 2, 4])
  a = model.generate(ids, mask, max_new_tokens=10, method="sample", seed=7, temperature=1.5)
  b = model.generate(ids, mask, max_new_tokens=10, method="sample", seed=7, temperature=1.5)
  c = model.generate(ids, mask, max_new_tokens=10, method="sample", seed=8, temperature=1.5)
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()
  assert (a[0] != a[1]).any()


# ------------------------------------------------------------------------------------------- scoring

def test_score_equals_transformers_log_probs(gemma_dir, tmp_path):
  model = t5x_lite.load(gemma_dir, progress=False)
  hf = tf.Gemma2ForCausalLM.from_pretrained(gemma_dir).eval()
  ids, mask = _left_padded(np.random.default_rng(3), 2, 6, [0, 2])
  targets = np.random.default_rng(4).integers(3, 128, (2, 5))
  targets[1, 3:] = 0  # right-padded target
  full = np.concatenate([ids, targets], axis=1)
  full_mask = np.concatenate([mask, (targets != 0).astype(int)], axis=1)
  with torch.no_grad():
    logits = hf(input_ids=torch.tensor(full), attention_mask=torch.tensor(full_mask)).logits
  logp = torch.log_softmax(logits.float(), -1).numpy()[:, 5:-1]
  ref = np.array([sum(logp[b, j, targets[b, j]] for j in range(5) if targets[b, j] != 0) for b in range(2)])
  np.testing.assert_allclose(model.score(ids, targets, mask), ref, rtol=1e-4, atol=1e-4)

  t5_dir = tmp_path / "t5"
  t5_hf = build_hf(tf.T5ForConditionalGeneration, tf.T5Config(**T5_TINY), t5_dir)
  t5m = t5x_lite.load(str(t5_dir), progress=False)
  enc = np.random.default_rng(5).integers(3, 128, (2, 8))
  labels = torch.tensor(np.where(targets == 0, -100, targets))
  with torch.no_grad():
    out = t5_hf(input_ids=torch.tensor(enc), labels=labels)
  logp = torch.log_softmax(out.logits, -1).numpy()
  ref = np.array([sum(logp[b, j, targets[b, j]] for j in range(5) if targets[b, j] != 0) for b in range(2)])
  np.testing.assert_allclose(t5m.score(enc, targets), ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ sharding and buckets

@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")
@pytest.mark.parametrize("spec", ["data:2,fsdp:2,tensor:2", "data:8"])
def test_sharded_generation_equals_single_device(gemma_dir, spec):
  ids, mask = _left_padded(np.random.default_rng(6), 5, 8, [0, 1, 2, 3, 0])
  single = t5x_lite.load(gemma_dir, progress=False).generate(ids, mask, max_new_tokens=9)
  sharded = t5x_lite.load(gemma_dir, mesh=t5x_lite.make_mesh(spec), progress=False)
  np.testing.assert_array_equal(sharded.generate(ids, mask, max_new_tokens=9), single)
  np.testing.assert_array_equal(sharded.generate(ids, mask, max_new_tokens=9, method="sample", seed=3),
                                t5x_lite.load(gemma_dir, progress=False).generate(ids, mask, max_new_tokens=9,
                                                                                   method="sample", seed=3))


class _CompileCounter(logging.Handler):
  def __init__(self):
    super().__init__()
    self.names = []

  def emit(self, record):
    msg = record.getMessage()
    if msg.startswith("Compiling "):
      self.names.append(msg.split()[1])


def test_buckets_bound_compilations(gemma_dir):
  model = t5x_lite.load(gemma_dir, progress=False)
  rng = np.random.default_rng(7)
  model.generate(np.ones((1, 3), np.int32), max_new_tokens=5)  # warm the small helper programs
  counter = _CompileCounter()
  logger = logging.getLogger("jax")
  logger.addHandler(counter)
  jax.config.update("jax_log_compiles", True)
  try:
    # 24 requests: batch 1..8, prompts 1..16, outputs 1..16 -> at most 4 x 1 x 1 buckets.
    for _ in range(24):
      b, p, n = rng.integers(1, 9), rng.integers(1, 17), rng.integers(1, 17)
      model.generate(rng.integers(3, 128, (b, p)), max_new_tokens=int(n))
  finally:
    jax.config.update("jax_log_compiles", False)
    logger.removeHandler(counter)
  # Every compilation in the stream is the decoding program itself, once per batch bucket (1, 2, 4, 8).
  assert set(counter.names) == {"jit(generate_tokens)"}, counter.names
  assert 2 <= len(counter.names) <= 4, counter.names


# ------------------------------------------------------------------------------------------ beam search

def _hf_beam(hf, kwargs, beams, penalty, n, strip, eos, pad):
  with torch.no_grad():
    ref = hf.generate(**kwargs, do_sample=False, num_beams=beams, length_penalty=penalty, max_new_tokens=n,
                      eos_token_id=eos, pad_token_id=pad).numpy()[:, strip:]
  # transformers fills after EOS with the EOS id when pad is 0 and crops to the longest row; ours: pad, full width.
  out = np.full((ref.shape[0], n), pad, ref.dtype)
  for r, row in enumerate(ref):
    end = np.flatnonzero(row == eos)
    row = row[:end[0] + 1] if end.size else row
    out[r, :len(row)] = row
  return out


@pytest.mark.parametrize("beams,penalty", [(3, 1.0), (4, 2.0), (2, -0.5)])
def test_beam_search_equals_transformers(tmp_path, beams, penalty):
  model_cls, config = DECODER_ONLY["gemma2"]
  hf = build_hf(model_cls, config, tmp_path / "gemma", seed=6)
  with torch.no_grad():
    for p in hf.parameters():
      p.mul_(4.0)
  ids, mask = _left_padded(np.random.default_rng(8), 3, 7, [0, 2, 4])
  kwargs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
  eos = _with_eos_from_greedy(hf, tmp_path / "gemma", kwargs, strip=7, at=2)
  ref = _hf_beam(hf, kwargs, beams, penalty, 10, 7, eos, 0)
  ours = t5x_lite.load(str(tmp_path / "gemma"), progress=False).generate(
      ids, mask, max_new_tokens=10, method="beam", num_beams=beams, length_penalty=penalty)
  np.testing.assert_array_equal(ours, ref)

  t5_kwargs = {**T5_TINY, "num_decoder_layers": 2}
  t5_hf = build_hf(tf.T5ForConditionalGeneration, tf.T5Config(**t5_kwargs), tmp_path / "t5", seed=7)
  with torch.no_grad():
    for p in t5_hf.parameters():
      p.mul_(3.0)
  enc = np.random.default_rng(9).integers(3, 128, (3, 8))
  enc_mask = np.ones_like(enc)
  enc_mask[2, 5:] = 0
  kwargs = dict(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc_mask))
  eos = _with_eos_from_greedy(t5_hf, tmp_path / "t5", kwargs, strip=1, at=2)
  ref = _hf_beam(t5_hf, kwargs, beams, penalty, 10, 1, eos, 0)
  ours = t5x_lite.load(str(tmp_path / "t5"), progress=False).generate(
      enc, enc_mask, max_new_tokens=10, method="beam", num_beams=beams, length_penalty=penalty)
  np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("family", ["gemma_mqa", "t5"])
def test_a_single_row_generates_what_it_generates_inside_a_batch(family, tmp_path):
  """Batch 1 and multi-query (K = 1) caches are stored without their size-1 axes (decoding/kv_cache.py); the
  tokens must not depend on that, for greedy and beam search (which repeats and reorders cache rows)."""
  if family == "t5":
    build_hf(tf.T5ForConditionalGeneration, tf.T5Config(**T5_TINY), tmp_path, seed=11)
    ids = np.random.default_rng(12).integers(3, 128, (3, 6))
    mask = np.ones_like(ids)
  else:
    build_hf(*DECODER_ONLY["gemma"], tmp_path, seed=11)  # num_key_value_heads=1
    ids, mask = _left_padded(np.random.default_rng(12), 3, 6, [0, 0, 0])
  model = t5x_lite.load(str(tmp_path), progress=False)
  for kwargs in (dict(method="greedy"), dict(method="beam", num_beams=3)):
    batch = model.generate(ids, mask, max_new_tokens=6, **kwargs)
    for row in range(3):
      single = model.generate(ids[row:row + 1], mask[row:row + 1], max_new_tokens=6, **kwargs)
      np.testing.assert_array_equal(single[0], batch[row], err_msg=f"{kwargs} row {row}")
