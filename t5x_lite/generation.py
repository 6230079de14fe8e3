"""Wires each family's incremental-decoding functions to the model-agnostic decoding core.

`generate_fn(config, ...)` returns a jitted `generate_tokens`: (params, ids, mask, limit, rng, done) ->
(B, max_new) tokens; `score_fn(config)` a jitted `score_targets`: (params, ids, mask, targets) -> (B,)
log-probabilities.
"""

import functools

import jax
import jax.numpy as jnp

from t5x_lite.decoding import kv_cache
from t5x_lite.decoding.loop import decode_tokens
from t5x_lite.models import gemma_decode, t5


def _repeat_rows(x, beams: int, axis: int):
  return None if x is None else jnp.repeat(x, beams, axis=axis)


def _t5_decoder(params, config, ids, mask, beams: int, max_new: int):
  """(step_fn, initial state, first tokens, reorder_fn) for T5 over B*beams rows."""
  B = ids.shape[0]
  N = B * beams
  H = config.num_heads
  encoded = t5.encode(params, config, ids, mask)
  layers = t5.decoder_layer_params(params, config)
  cross = t5.cross_attention_kv(layers, config, encoded)
  cross = jax.tree.map(lambda x: kv_cache.repeat_rows(x, beams, B, H), cross)
  mask = _repeat_rows(mask, beams, 0)
  cache = t5.init_decoder_cache(config, N, max_new)

  def step(tokens, cache, t):
    return t5.decoder_step(params, config, layers, tokens, t, cache, cross, mask)

  def reorder(cache, index):
    return jax.tree.map(lambda x: kv_cache.take_rows(x, index, N, H), cache)

  first = jnp.full((N,), config.decoder_start_token_id, jnp.int32)
  return step, cache, first, None, reorder


def _gemma_decoder(params, config, ids, mask, beams: int, max_new: int):
  """Prefill, then (step_fn, state, None, first logits, reorder_fn) over B*beams rows."""
  B, P = ids.shape
  N = B * beams
  K = config.num_kv_heads
  first_logits, cache = gemma_decode.prefill(params, config, ids, mask, P + max_new)
  layers = gemma_decode.decode_layer_params(params, config)

  def rows(cache, kv_fn, other_fn):
    return {name: [kv_fn(x) for x in xs] if name in ("k", "v") else other_fn(xs) for name, xs in cache.items()}

  if beams > 1:
    cache = rows(cache, lambda x: kv_cache.repeat_rows(x, beams, B, K), lambda x: _repeat_rows(x, beams, 0))
    first_logits = _repeat_rows(first_logits, beams, 0)

  def step(tokens, cache, t, vocab_major=False):
    return gemma_decode.decode_step(params, config, layers, tokens, P + t - 1, cache, vocab_major=vocab_major)

  def reorder(cache, index):
    return rows(cache, lambda x: kv_cache.take_rows(x, index, N, K), lambda x: jnp.take(x, index, axis=0))

  return step, cache, None, first_logits, reorder


_DECODERS = {"t5": _t5_decoder, "gemma": _gemma_decoder}


@functools.lru_cache(maxsize=64)
def generate_fn(config, *, max_new: int, method: str, temperature: float, top_k: int, top_p: float,
                num_beams: int, length_penalty: float, brevity: str):
  """A jitted (params, ids, mask, limit, rng, done) -> (B, max_new) int32 for this config and method.

  `limit` (traced) stops the loop after that many tokens, so `max_new` can be a bucket.
  """
  eos, pad = config.eos_token_id, config.pad_token_id

  def generate_tokens(params, ids, mask, limit, rng, done):
    beams = num_beams if method == "beam" else 1
    step, state, first, first_logits, reorder = _DECODERS[config.family](params, config, ids, mask, beams, max_new)
    if method == "beam":
      from t5x_lite.decoding.beam_search import beam_search  # pylint: disable=import-outside-toplevel
      first_token = None if first is None else first[::beams]
      # prompt_length=1: T5X's brevity penalty counts the new tokens only, for every family (a left-padded
      # decoder-only bucket would otherwise count its padding).
      out = beam_search(step, state, reorder, first_token, num_beams=beams, max_new_tokens=max_new, eos_id=eos,
                        pad_id=pad, length_penalty=length_penalty, brevity=brevity, prompt_length=1,
                        vocab_size=config.vocab_size, limit=limit, done_B=done,
                        first_logits_BV=None if first_logits is None else first_logits[::beams])
    else:
      # Vocabulary-major logits from a tied Gemma head (see decode_tokens).
      vocab_major = config.family == "gemma" and config.tie_lm_head
      step_fn = functools.partial(step, vocab_major=True) if vocab_major else step
      out = decode_tokens(step_fn, state, first, max_new_tokens=max_new, eos_id=eos, pad_id=pad, method=method,
                          temperature=temperature, top_k=top_k, top_p=top_p, rng=rng, first_logits_RV=first_logits,
                          done_R=done, limit=limit, vocab_major=vocab_major)
    return out

  return jax.jit(generate_tokens)


@functools.lru_cache(maxsize=16)
def score_fn(config):
  """A jitted (params, ids, mask, targets) -> (B,) float32 sum of target log-probabilities (pad targets skipped).

  Encoder-decoder: the decoder reads the start token then targets[:, :-1]. Decoder-only: the targets continue
  the left-padded prompt.
  """
  pad = config.pad_token_id

  def score_targets(params, ids, mask, targets):
    target_mask = (targets != pad).astype(jnp.int32)
    if config.family == "t5":
      decoder_in = t5.shift_right(targets, config.decoder_start_token_id, pad)
      logits = t5.forward(params, config, ids, mask, decoder_in, None)
    else:
      from t5x_lite.models import gemma  # pylint: disable=import-outside-toplevel
      P = ids.shape[1]
      full_mask = jnp.concatenate([jnp.ones_like(ids) if mask is None else mask, target_mask], axis=1)
      logits = gemma.forward(params, config, jnp.concatenate([ids, targets], axis=1), full_mask)
      logits = logits[:, P - 1:-1]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(token_logp * target_mask, axis=1)

  return jax.jit(score_targets)
