"""Beam search against transformers' own `generate(num_beams=..., length_penalty=...)`, and against exhaustive search.

The HF tests drive our search with logits from the same tiny torch model (a `jax.pure_callback` on the full
token history, as transformers computes them with `use_cache=False`), so they test the search itself: every
tie-break, the early-stop heuristic and the max-length ending. The exhaustive tests use a small Markov
"model" in JAX and check that, with enough beams to hold every prefix, the search returns the best
normalised sequence, for the cases where the stop is exact.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite.decoding.beam_search import beam_search, length_normalizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

V = 64  # vocab of the tiny HF models
PAD = 0


def _perturb(model, seed, scale=0.5):
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * scale)
  return model.eval()


@pytest.fixture(scope="module")
def t5():
  """A tiny T5 (weights perturbed for peaky distributions) and its encoder inputs, one row padded."""
  torch.manual_seed(0)
  config = transformers.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                                 num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                                 dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
  model = _perturb(transformers.T5ForConditionalGeneration(config), seed=1)
  rng = np.random.default_rng(0)
  ids = rng.integers(2, V, (3, 7))
  mask = np.ones_like(ids)
  ids[1, 5:], mask[1, 5:] = PAD, 0
  return model, torch.tensor(ids), torch.tensor(mask)


@pytest.fixture(scope="module")
def gemma():
  """A tiny Gemma (weights perturbed for peaky distributions) and a batch of equal-length prompts."""
  torch.manual_seed(0)
  config = transformers.GemmaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=1, head_dim=8)
  model = _perturb(transformers.GemmaForCausalLM(config), seed=2)
  rng = np.random.default_rng(1)
  ids = rng.integers(3, V, (3, 5))  # no pad tokens: one prompt length, no mask inference
  return model, torch.tensor(ids), torch.ones(ids.shape, dtype=torch.long)


def _eos_token(model, ids, mask, *, is_t5, num_beams, length_penalty, max_new_tokens, row, step, **_):
  """An EOS id the model actually produces: the token at (`row`, `step`) of HF's beam output without any EOS."""
  with torch.no_grad():
    out = model.generate(ids, attention_mask=mask, num_beams=num_beams, length_penalty=length_penalty,
                         do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=PAD,
                         use_cache=False)
  return int(out[row, (1 if is_t5 else ids.shape[1]) + step])


def _hf_beam(model, ids, mask, *, is_t5, num_beams, length_penalty, max_new_tokens, eos, pad, **generate_kw):
  """HF's answer as our API states it: only new tokens, pad after the first EOS, padded to max_new_tokens."""
  with torch.no_grad():
    out = model.generate(ids, attention_mask=mask, num_beams=num_beams, length_penalty=length_penalty,
                         do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad,
                         use_cache=False, **generate_kw).numpy()
  new = out[:, 1 if is_t5 else ids.shape[1]:]
  result = np.full((ids.shape[0], max_new_tokens), pad, np.int32)
  eos_set = np.atleast_1d(eos)
  for b, row in enumerate(new):
    ends = np.flatnonzero(np.isin(row, eos_set))
    row = row[:ends[0] + 1] if len(ends) else row
    result[b, :len(row)] = row
  return result


def _torch_step(model, ids, mask, *, is_t5, num_beams, history_len):
  """(step_fn, state, reorder_fn, first_logits_BV) whose logits come from `model` on the full token history.

  state = (history_NL int32, length int32); step_fn writes the fed token at `length` and returns the model's
  last logits for history[:, :length + 1], for all N rows at once as transformers does without a cache.
  """
  K = num_beams
  mask_N = mask.repeat_interleave(K, dim=0)
  with torch.no_grad():
    encoded = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state if is_t5 else None
  enc_N = None if encoded is None else encoded.repeat_interleave(K, dim=0)
  prompt_N = ids.repeat_interleave(K, dim=0)

  def logits_np(history, length):
    seq = torch.from_numpy(np.asarray(history)[:, :int(length)].astype(np.int64))
    with torch.no_grad():
      if is_t5:
        out = model(encoder_outputs=(enc_N,), attention_mask=mask_N, decoder_input_ids=seq, use_cache=False)
      else:
        out = model(input_ids=seq, attention_mask=torch.ones_like(seq), use_cache=False)
    return out.logits[:, -1, :].to(torch.float32).numpy()

  N = ids.shape[0] * K
  out_shape = jax.ShapeDtypeStruct((N, V), jnp.float32)

  def step_fn(tokens_N, state, t):
    history, length = state
    history = jax.lax.dynamic_update_slice_in_dim(history, tokens_N[:, None].astype(jnp.int32), length, axis=1)
    length = length + 1
    return jax.pure_callback(logits_np, out_shape, history, length), (history, length)

  def reorder_fn(state, rows_N):
    history, length = state
    return history[rows_N], length

  if is_t5:
    state = (jnp.zeros((N, history_len), jnp.int32), jnp.int32(0))
    return step_fn, state, reorder_fn, None
  P = ids.shape[1]
  history = jnp.zeros((N, P + history_len), jnp.int32).at[:, :P].set(jnp.asarray(prompt_N.numpy(), jnp.int32))
  # First logits exactly as HF's prefill computes them: on the N expanded rows, then one row per batch row.
  first_logits_BV = logits_np(np.asarray(history), P)[::K]
  return step_fn, (history, jnp.int32(P)), reorder_fn, first_logits_BV


def _ours(model, ids, mask, *, is_t5, num_beams, length_penalty, max_new_tokens, eos, pad, use_first_logits=True,
          limit=None, width=None, early_stopping=None, done=None):
  width = width or max_new_tokens
  step_fn, state, reorder_fn, first_logits = _torch_step(model, ids, mask, is_t5=is_t5, num_beams=num_beams,
                                                          history_len=width)
  B = ids.shape[0]
  if is_t5:
    first_token = jnp.full((B,), model.config.decoder_start_token_id, jnp.int32)
    prompt_length = 1
  elif use_first_logits:
    first_token = None
    prompt_length = ids.shape[1]
  else:
    # Decoder-only without prefill: feed the last prompt token at step 0 on the history without it.
    history, length = state
    state = (history, length - 1)
    first_token = jnp.asarray(ids[:, -1].numpy(), jnp.int32)
    first_logits = None
    prompt_length = ids.shape[1]

  @jax.jit
  def run(state, first_token, first_logits, limit, done):
    return beam_search(step_fn, state, reorder_fn, first_token, num_beams=num_beams, max_new_tokens=width,
                       eos_id=eos, pad_id=pad, length_penalty=length_penalty, prompt_length=prompt_length,
                       vocab_size=V, first_logits_BV=first_logits, limit=limit, early_stopping=early_stopping,
                       done_B=done)

  out = np.asarray(run(state, first_token, first_logits, limit, done))
  assert out.shape == (B, width) and out.dtype == np.int32
  return out


T5_CASES = [  # (num_beams, length_penalty, max_new_tokens, eos_row, eos_step, pad)
    (2, 1.0, 8, 0, 2, PAD),
    (4, 1.0, 8, 1, 2, PAD),
    (4, 0.0, 8, 2, 1, PAD),
    (4, 2.0, 8, 0, 3, PAD),
    (2, -0.5, 7, 1, 2, 5),
    (4, -0.5, 10, 2, 4, 5),
    (3, 2.0, 6, 0, 1, PAD),
    (3, 1.0, 10, 0, 2, PAD),  # the early-stop heuristic closes row 0 before a better, longer hypothesis
]
GEMMA_CASES = [
    (2, 1.0, 8, 0, 2, PAD),
    (4, 1.0, 8, 1, 2, PAD),
    (4, 0.0, 8, 2, 1, PAD),
    (4, 2.0, 8, 0, 3, PAD),
    (2, -0.5, 7, 1, 2, 5),
    (4, -0.5, 10, 2, 4, 5),
    (2, 2.0, 8, 0, 0, PAD),  # these two: the early-stop heuristic decides a row's answer
    (2, 1.0, 10, 2, 1, PAD),
]
CASE_FIELDS = "num_beams,length_penalty,max_new_tokens,row,step,pad"


_EOS_CACHE = {}


def _case(model, ids, mask, is_t5, case):
  """generate() arguments for a case tuple, with its EOS id (computed once per model and case)."""
  kw = dict(zip(CASE_FIELDS.split(","), case), is_t5=is_t5)
  key = (id(model), case)
  if key not in _EOS_CACHE:
    _EOS_CACHE[key] = _eos_token(model, ids, mask, **kw)
  eos = _EOS_CACHE[key]
  return dict(is_t5=is_t5, num_beams=kw["num_beams"], length_penalty=kw["length_penalty"],
              max_new_tokens=kw["max_new_tokens"], eos=eos, pad=kw["pad"])


@pytest.mark.parametrize("case", T5_CASES)
def test_t5_matches_hf(t5, case):
  model, ids, mask = t5
  kw = _case(model, ids, mask, True, case)
  np.testing.assert_array_equal(_ours(model, ids, mask, **kw), _hf_beam(model, ids, mask, **kw))


@pytest.mark.parametrize("case", GEMMA_CASES)
def test_gemma_matches_hf(gemma, case):
  model, ids, mask = gemma
  kw = _case(model, ids, mask, False, case)
  np.testing.assert_array_equal(_ours(model, ids, mask, **kw), _hf_beam(model, ids, mask, **kw))


def test_gemma_without_prefill_logits_matches_hf(gemma):
  """The same search when step 0 feeds the last prompt token instead of taking prefill logits."""
  model, ids, mask = gemma
  kw = _case(model, ids, mask, False, (3, 1.0, 8, 1, 2, PAD))
  np.testing.assert_array_equal(_ours(model, ids, mask, use_first_logits=False, **kw),
                                _hf_beam(model, ids, mask, **kw))


@pytest.mark.parametrize("early_stopping", [True, "never"])
@pytest.mark.parametrize("family,case", [("t5", (3, 1.0, 10, 0, 2, PAD)), ("gemma", (2, 2.0, 8, 0, 0, PAD)),
                                         ("gemma", (2, 1.0, 10, 2, 1, PAD))])
def test_early_stopping_options_match_hf(request, family, case, early_stopping):
  model, ids, mask = request.getfixturevalue(family)
  kw = _case(model, ids, mask, family == "t5", case)
  np.testing.assert_array_equal(_ours(model, ids, mask, early_stopping=early_stopping, **kw),
                                _hf_beam(model, ids, mask, early_stopping=early_stopping, **kw))


def test_several_eos_ids_match_hf(t5):
  """transformers keeps (1 + #eos) * num_beams continuations when several EOS ids are given."""
  model, ids, mask = t5
  kw = _case(model, ids, mask, True, (2, 1.0, 8, 0, 2, PAD))
  kw["eos"] = sorted({kw["eos"], _case(model, ids, mask, True, (2, 1.0, 8, 2, 1, PAD))["eos"]})
  np.testing.assert_array_equal(_ours(model, ids, mask, **kw), _hf_beam(model, ids, mask, **kw))


def test_limit_below_width_matches_hf_at_the_limit(t5):
  """A traced `limit` gives HF's search for that many tokens inside a wider (bucketed) output."""
  model, ids, mask = t5
  kw = _case(model, ids, mask, True, (4, 1.0, 5, 1, 3, PAD))
  ours = _ours(model, ids, mask, limit=jnp.int32(5), width=9, **kw)
  np.testing.assert_array_equal(ours[:, :5], _hf_beam(model, ids, mask, **kw))
  assert (ours[:, 5:] == PAD).all()


@pytest.mark.parametrize("early_stopping", [False, True])
def test_done_rows_come_back_pad_and_leave_the_others_alone(gemma, early_stopping):
  model, ids, mask = gemma
  kw = _case(model, ids, mask, False, (2, 1.0, 8, 1, 2, PAD))
  ours = _ours(model, ids, mask, early_stopping=early_stopping, done=jnp.array([False, True, False]), **kw)
  ref = _hf_beam(model, ids, mask, early_stopping=early_stopping, **kw)
  ref[1] = PAD
  np.testing.assert_array_equal(ours, ref)


def test_hf_cases_cover_early_eos_max_length_and_the_heuristic(t5, gemma):
  """The cases above include hypotheses that end with EOS before the limit, ones that reach it, and rows where
  transformers' early-stop heuristic changes the answer (compared with early_stopping="never")."""
  early = at_limit = heuristic = 0
  for (model, ids, mask), is_t5, cases in ((t5, True, T5_CASES), (gemma, False, GEMMA_CASES)):
    for case in cases:
      kw = _case(model, ids, mask, is_t5, case)
      ref = _hf_beam(model, ids, mask, **kw)
      has_eos = (ref == kw["eos"]).any(axis=1)
      early += int((has_eos & (ref[:, -1] != kw["eos"])).sum())
      at_limit += int((~has_eos).sum())
      never = _hf_beam(model, ids, mask, early_stopping="never", **kw)
      heuristic += int(not np.array_equal(never, ref))
  assert early >= 8 and at_limit >= 8 and heuristic >= 2, (early, at_limit, heuristic)


# ------------------------------------------------------------------------------------------------------------
# Exhaustive search on a Markov "model" (logits depend on the previous token and the step).

def _markov(seed, vocab, steps):
  rng = np.random.default_rng(seed)
  return (rng.normal(0, 2.0, (vocab, vocab)) + rng.normal(0, 1.0, (steps, 1, vocab))).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _markov_runner(steps, vocab, *, num_beams, length_penalty, brevity, eos, start, prompt_length):
  """A jitted table_TVV -> (max_new_tokens,) search for one batch row (compiled once per setting)."""

  @jax.jit
  def run(table_TVV):
    def step_fn(tokens_N, state, t):
      return table_TVV[t][tokens_N], state

    return beam_search(step_fn, jnp.zeros((num_beams,)), lambda s, rows: s[rows], jnp.array([start], jnp.int32),
                       num_beams=num_beams, max_new_tokens=steps, eos_id=eos, pad_id=vocab, vocab_size=vocab,
                       length_penalty=length_penalty, brevity=brevity, prompt_length=prompt_length)[0]

  return run


def _markov_search(table_TVV, *, num_beams, length_penalty, brevity, eos, start=0, prompt_length=1):
  run = _markov_runner(table_TVV.shape[0], table_TVV.shape[1], num_beams=num_beams, length_penalty=length_penalty,
                       brevity=brevity, eos=eos, start=start, prompt_length=prompt_length)
  return np.asarray(run(jnp.asarray(table_TVV)))


def _markov_scores(table_TVV, *, length_penalty, brevity, eos, start=0, prompt_length=1):
  """{sequence: normalised score} for every sequence the search can end with (float64)."""
  steps, vocab = table_TVV.shape[0], table_TVV.shape[1]
  t = table_TVV.astype(np.float64)
  log_probs = t - np.log(np.exp(t - t.max(-1, keepdims=True)).sum(-1, keepdims=True)) - t.max(-1, keepdims=True)
  offset = 0 if brevity == "hf" else prompt_length - 1
  scores = {}
  for full in itertools.product(range(vocab), repeat=steps):
    seq = full[:full.index(eos) + 1] if eos in full else full
    if seq in scores:
      continue
    prev, total = start, 0.0
    for i, tok in enumerate(seq):
      total += log_probs[i, prev, tok]
      prev = tok
    scores[seq] = total / length_normalizer(offset + len(seq), length_penalty, brevity)
  return scores


@pytest.mark.parametrize("brevity,alpha", [("hf", 0.0), ("hf", -0.5), ("t5x", 0.6), ("t5x", 2.0), ("t5x", -0.5)])
def test_exhaustive_beams_find_the_best_sequence(brevity, alpha):
  """With beams enough for every prefix, and an exact stop (hf with length_penalty <= 0, or t5x), the search
  returns the best normalised sequence of all."""
  vocab, steps, eos = 4, 4, 2
  beams = (vocab - 1) ** (steps - 1) * vocab  # every candidate of the last step is among the first K
  for seed in range(3):
    table = _markov(seed, vocab, steps)
    scores = _markov_scores(table, length_penalty=alpha, brevity=brevity, eos=eos)
    ours = _markov_search(table, num_beams=beams, length_penalty=alpha, brevity=brevity, eos=eos)
    seq = tuple(int(x) for x in ours[ours != vocab])
    best = max(scores.values())
    assert abs(scores[seq] - best) <= 1e-5 * max(1.0, abs(best)), (seed, seq, scores[seq], best)


def test_t5x_brevity_differs_from_hf_where_the_penalty_matters():
  vocab, steps, eos = 4, 4, 2
  beams = (vocab - 1) ** (steps - 1) * vocab
  differs = 0
  for seed in range(6):
    table = _markov(seed, vocab, steps)
    kw = dict(num_beams=beams, eos=eos)
    # alpha = 0: both are the plain sum of log-probs.
    np.testing.assert_array_equal(_markov_search(table, length_penalty=0.0, brevity="t5x", **kw),
                                  _markov_search(table, length_penalty=0.0, brevity="hf", **kw))
    for alpha in (-0.5, 2.0):
      hf = _markov_search(table, length_penalty=alpha, brevity="hf", **kw)
      t5x = _markov_search(table, length_penalty=alpha, brevity="t5x", **kw)
      differs += int(not np.array_equal(hf, t5x))
  assert differs >= 2


def test_t5x_counts_the_decoder_prompt_after_its_first_token():
  """With prompt_length P, T5X's length is P - 1 + new tokens; a long prompt changes which sequence wins."""
  vocab, steps, eos = 4, 4, 2
  beams = (vocab - 1) ** (steps - 1) * vocab
  changed = 0
  for seed in range(4):
    table = _markov(seed, vocab, steps)
    winners = []
    for prompt_length in (1, 6):
      scores = _markov_scores(table, length_penalty=-1.0, brevity="t5x", eos=eos, prompt_length=prompt_length)
      ours = _markov_search(table, num_beams=beams, length_penalty=-1.0, brevity="t5x", eos=eos,
                            prompt_length=prompt_length)
      seq = tuple(int(x) for x in ours[ours != vocab])
      best = max(scores.values())
      assert abs(scores[seq] - best) <= 1e-5 * max(1.0, abs(best)), (seed, prompt_length)
      winners.append(seq)
    changed += int(winners[0] != winners[1])
  assert changed >= 1


def test_length_normalizer_formulas():
  n = np.arange(1, 12, dtype=np.float64)
  for alpha in (0.0, 0.6, 1.0, 2.0, -0.5):
    np.testing.assert_allclose([length_normalizer(int(k), alpha, "hf") for k in n], n ** alpha, rtol=1e-15)
    np.testing.assert_allclose([length_normalizer(int(k), alpha, "t5x") for k in n], ((5.0 + n) / 6.0) ** alpha,
                               rtol=1e-15)
  assert length_normalizer(1, 0.6, "t5x") == 1.0  # T5X's penalty is 1 for a one-token output
  with pytest.raises(ValueError):
    length_normalizer(3, 1.0, "gnmt")
