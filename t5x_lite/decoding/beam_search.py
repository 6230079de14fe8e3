"""Beam search that returns, token for token, what transformers' `generate(num_beams=W, do_sample=False)` returns.

One compiled `lax.while_loop`, static shapes, nothing sent to the host. A model plugs in through
`step_fn(tokens_R, state, t) -> (logits_RV, state)` and `reorder_fn(state, rows_R) -> state`; row
`b * W + j` is beam j of batch row b. Nothing here knows which family it decodes.

The search is transformers 5.x's (`GenerationMixin._beam_search`, `num_return_sequences=1`), step by step:
  1. Add the log-softmax of each running beam's logits to its running score; keep the best
     C = max(2, 1 + #eos) * W of the W * V continuations of each row (before the first step only beam 0 is
     alive: the others start at -1e9).
  2. A continuation "hits" when its token is an EOS or the step is the last one allowed.
  3. The next running beams are the best W continuations that do not hit.
  4. Among the first W of the C continuations (only those), the ones that hit become finished hypotheses
     with score sum_logprobs / n ** length_penalty, where n counts the new tokens including the EOS
     (the decoder prompt, e.g. T5's start token, does not count). They join the finished set, which keeps its
     best W, but only while the row is still "open".
  5. A row closes for good once all W finished slots are filled and the best running score divided by
     n ** length_penalty is not above the worst finished score. With the default early_stopping=False, n is
     the running beams' current length (a heuristic when length_penalty > 0: a longer hypothesis could still
     have won); with "never" and length_penalty > 0 it is the length limit (exact).
  6. The loop stops when every row is closed or the length limit is reached (with early_stopping=True, also
     as soon as every row has W finished hypotheses). At the last step every continuation hits, so the best
     running beams become finished hypotheses, without an EOS.
The answer for a row is its best finished hypothesis. Floating-point steps follow transformers' float32
arithmetic (the length normalisers are computed in double precision and rounded to float32, as torch does
with a Python scalar), so ties and near-ties resolve the same way.

`brevity="t5x"` swaps the normaliser for T5X's brevity penalty ((5 + n) / 6) ** alpha, where n counts the
decoder tokens after the start token (prompt_length - 1 + new tokens: for a decoder-only prompt its tokens
after the first count, as in T5X's prefix decoding), and by default stops as T5X does, bounding the running
beams at the length limit (early_stopping="never"), which is exact. The rest of the search stays transformers'.
"""

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# transformers' "very large negative" score, used to mask continuations and empty slots.
_NEG = -1.0e9


def length_normalizer(length: int, alpha: float, brevity: str = "hf") -> float:
  """The divisor of a finished hypothesis' summed log-probability at `length` (double precision).

  "hf": length ** alpha (transformers' length_penalty). "t5x": ((5 + length) / 6) ** alpha (T5X's brevity
  penalty).
  """
  if brevity == "hf":
    return float(length) ** float(alpha)
  if brevity == "t5x":
    return ((5.0 + float(length)) / 6.0) ** float(alpha)
  raise ValueError(f"brevity must be 'hf' or 't5x', got {brevity!r}")


def _normalizers(max_new_tokens: int, alpha: float, brevity: str, prompt_length: int) -> np.ndarray:
  """(max_new_tokens + 1,) float32: entry n divides the score of a hypothesis with n new tokens."""
  offset = 0 if brevity == "hf" else max(prompt_length - 1, 0)
  table = [1.0] + [length_normalizer(offset + n, alpha, brevity) for n in range(1, max_new_tokens + 1)]
  return np.asarray(table, np.float64).astype(np.float32)


class _Beams(NamedTuple):
  """Search state of B rows x W beams over T new-token positions (pad after the last written one)."""
  running_BWT: jax.Array  # int32 tokens of the running beams
  running_scores_BW: jax.Array  # float32 summed log-probs, best first
  finished_BWT: jax.Array  # int32 tokens of the finished hypotheses
  finished_scores_BW: jax.Array  # float32 normalised scores, best first (about -1e9 or below: empty slot)
  finished_BW: jax.Array  # bool, the slot holds a finished hypothesis
  open_B: jax.Array  # bool, the row may still take finished hypotheses


def _init_beams(B: int, W: int, T: int, pad_id: int) -> _Beams:
  tokens = jnp.full((B, W, T), pad_id, jnp.int32)
  running_scores = jnp.zeros((B, W), jnp.float32).at[:, 1:].set(_NEG)
  return _Beams(tokens, running_scores, tokens, jnp.full((B, W), _NEG, jnp.float32), jnp.zeros((B, W), bool),
                jnp.ones((B,), bool))


def _take(x_BW, idx_BJ):
  """x[b, idx[b, j], ...] for an array laid out (B, W, ...)."""
  idx = idx_BJ.reshape(idx_BJ.shape + (1,) * (x_BW.ndim - 2))
  return jnp.take_along_axis(x_BW, idx, axis=1)


def _mask(condition, x):
  """x + (-1e9 where condition, else 0), in float32 as transformers adds its masks."""
  return x + jnp.where(condition, jnp.float32(_NEG), jnp.float32(0.0))


def _advance(beams: _Beams, logits_RV: jax.Array, t, *, W: int, C: int, eos_ids: tuple[int, ...], last_step,
             norm_T1: jax.Array, bound_norm, close_when_full: bool) -> tuple[_Beams, jax.Array]:
  """One step on the logits that follow the running beams. Returns the new search state and, for the caller's
  state, the (R,) source row of each new running beam."""
  B = beams.running_BWT.shape[0]
  V = logits_RV.shape[-1]
  log_probs_BWV = jax.nn.log_softmax(logits_RV.astype(jnp.float32), axis=-1).reshape(B, W, V)
  totals_BWV = log_probs_BWV + beams.running_scores_BW[:, :, None]
  cand_scores_BC, flat_BC = jax.lax.top_k(totals_BWV.reshape(B, W * V), C)
  source_BC = flat_BC // V
  token_BC = (flat_BC % V).astype(jnp.int32)
  cand_BCT = jax.lax.dynamic_update_slice_in_dim(_take(beams.running_BWT, source_BC), token_BC[:, :, None], t,
                                                 axis=2)
  hits_BC = last_step | jnp.isin(token_BC, jnp.asarray(eos_ids, jnp.int32))

  # Running beams for the next step: the best W continuations that did not hit.
  live_scores_BC = _mask(hits_BC, cand_scores_BC)
  keep_BW = jax.lax.top_k(live_scores_BC, W)[1]
  running_BWT = _take(cand_BCT, keep_BW)
  running_scores_BW = _take(live_scores_BC, keep_BW)
  parent_R = (_take(source_BC, keep_BW) + W * jnp.arange(B)[:, None]).reshape(B * W).astype(jnp.int32)

  # Finished hypotheses: those of the first W continuations that hit, while the row is open.
  new_BC = hits_BC & (jnp.arange(C) < W)[None, :]
  new_scores_BC = cand_scores_BC / norm_T1[t + 1]
  if close_when_full:  # early_stopping=True: a row with W finished hypotheses takes no more
    new_scores_BC = _mask(jnp.all(beams.finished_BW, axis=1, keepdims=True), new_scores_BC)
  new_scores_BC = _mask(~new_BC, _mask(~beams.open_B[:, None], new_scores_BC))
  merged_scores = jnp.concatenate([beams.finished_scores_BW, new_scores_BC], axis=1)
  best_BW = jax.lax.top_k(merged_scores, W)[1]
  finished_BWT = _take(jnp.concatenate([beams.finished_BWT, cand_BCT], axis=1), best_BW)
  finished_scores_BW = _take(merged_scores, best_BW)
  finished_BW = _take(jnp.concatenate([beams.finished_BW, new_BC], axis=1), best_BW)

  # Can a running beam still beat the worst finished hypothesis? If not, the row closes for good.
  best_possible_B = running_scores_BW[:, 0] / bound_norm
  worst_BW = jnp.where(finished_BW, jnp.min(finished_scores_BW, axis=1, keepdims=True), jnp.float32(_NEG))
  open_B = beams.open_B & jnp.any(best_possible_B[:, None] > worst_BW, axis=1)

  return _Beams(running_BWT, running_scores_BW, finished_BWT, finished_scores_BW, finished_BW, open_B), parent_R


def beam_search(step_fn: Callable, state, reorder_fn: Callable, first_token_B: jax.Array | None, *, num_beams: int,
                max_new_tokens: int, eos_id: int | Sequence[int], pad_id: int, length_penalty: float = 1.0,
                brevity: str = "hf", prompt_length: int = 0, vocab_size: int,
                first_logits_BV: jax.Array | None = None, limit: jax.Array | int | None = None,
                early_stopping: bool | str | None = None, done_B: jax.Array | None = None) -> jax.Array:
  """(B, max_new_tokens) int32: each row's best hypothesis, EOS kept, pad after it (no EOS if none ended).

  `state` is already expanded to R = B * num_beams rows; `reorder_fn(state, rows_R)` gathers its rows.
  Either `first_token_B` is fed at step 0 (encoder-decoders: the decoder start token), or `first_logits_BV`
  (decoder-only: the prefill's last logits) score step 0 and `step_fn` is first called at t = 1; in both,
  `step_fn` at step t receives the tokens chosen at step t - 1. `eos_id` may be one id or several (as
  transformers' eos_token_id list). `length_penalty` is transformers' exponent ("hf") or T5X's alpha ("t5x").
  `prompt_length` is the decoder prompt length transformers sees (1 for an encoder-decoder, the prompt length
  for decoder-only): "hf" does not need it, "t5x" counts prompt_length - 1 of it. `limit` (may be traced)
  lowers the length limit below `max_new_tokens`, so the output width can be a shape bucket; the search is
  then the one for `limit` tokens. `early_stopping` is transformers' (False, True or "never"); None means
  False for "hf" and "never" for "t5x". `done_B` marks rows that need no output (batch padding): they come
  back all pad and do not hold the loop open. Call it under `jax.jit`; every argument but the arrays is static.
  """
  if brevity not in ("hf", "t5x"):
    raise ValueError(f"brevity must be 'hf' or 't5x', got {brevity!r}")
  if early_stopping is None:
    early_stopping = "never" if brevity == "t5x" else False
  if early_stopping not in (False, True, "never"):
    raise ValueError(f"early_stopping must be False, True or 'never', got {early_stopping!r}")
  if first_token_B is None and first_logits_BV is None:
    raise ValueError("give first_token_B or first_logits_BV")
  eos_ids = (int(eos_id),) if np.ndim(eos_id) == 0 else tuple(int(e) for e in eos_id)
  W, T = int(num_beams), int(max_new_tokens)
  if W < 1 or T < 1:
    raise ValueError(f"num_beams and max_new_tokens must be at least 1, got {W} and {T}")
  C = max(2, 1 + len(eos_ids)) * W
  if W * vocab_size < C:
    raise ValueError(f"num_beams * vocab_size = {W * vocab_size} is below the {C} continuations kept per step")
  B = (first_logits_BV if first_logits_BV is not None else first_token_B).shape[0]
  R = B * W

  norm_T1 = jnp.asarray(_normalizers(T, length_penalty, brevity, prompt_length))
  limit = jnp.int32(T) if limit is None else jnp.clip(jnp.asarray(limit, jnp.int32), 1, T)
  bound_at_limit = early_stopping == "never" and float(length_penalty) > 0.0
  close_when_full = early_stopping is True

  def advance(beams, logits_RV, t):
    if logits_RV.shape != (R, vocab_size):
      raise ValueError(f"step_fn gave logits of shape {logits_RV.shape}, expected {(R, vocab_size)}")
    bound_norm = norm_T1[limit] if bound_at_limit else norm_T1[t + 1]
    return _advance(beams, logits_RV, t, W=W, C=C, eos_ids=eos_ids, last_step=t >= limit - 1, norm_T1=norm_T1,
                    bound_norm=bound_norm, close_when_full=close_when_full)

  def next_tokens(beams, t):
    return jax.lax.dynamic_index_in_dim(beams.running_BWT, t, axis=2, keepdims=False).reshape(R)

  def cond(carry):
    t, beams, _, _ = carry
    going = (t < limit) & jnp.any(beams.open_B)
    if close_when_full:  # a closed row has all its slots filled, except a `done_B` row, which has none
      going &= ~jnp.all(beams.finished_BW | ~beams.open_B[:, None])
    return going

  def body(carry):
    t, beams, tokens_R, state = carry
    logits_RV, state = step_fn(tokens_R, state, t)
    beams, parent_R = advance(beams, logits_RV, t)
    state = reorder_fn(state, parent_R)
    return t + 1, beams, next_tokens(beams, t), state

  beams = _init_beams(B, W, T, pad_id)
  if done_B is not None:
    beams = beams._replace(open_B=~jnp.asarray(done_B, bool))
  if first_logits_BV is None:
    t0, tokens_R = jnp.int32(0), jnp.repeat(jnp.asarray(first_token_B, jnp.int32), W)
  else:
    # Every beam of a row holds the same state before the first step, so the state needs no reorder here.
    beams, _ = advance(beams, jnp.repeat(first_logits_BV.astype(jnp.float32), W, axis=0), jnp.int32(0))
    t0, tokens_R = jnp.int32(1), next_tokens(beams, 0)
  _, beams, _, _ = jax.lax.while_loop(cond, body, (t0, beams, tokens_R, state))
  return beams.finished_BWT[:, 0, :]
