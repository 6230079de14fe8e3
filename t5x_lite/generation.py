"""Wires each family's decoder (its registry hooks) to the model-agnostic decoding core.

`generate_fn(config, ...)` returns a jitted `generate_tokens`: (params, ids, mask, limit, rng, done, extra) ->
(B, max_new) tokens; `score_fn(config)` a jitted `score_targets`: (params, ids, mask, targets, extra) -> (B,)
log-probabilities. `extra` holds the keyword inputs a family's encoder takes beside the ids (a vision family's
`pixel_values_BI3HW`), {} for text. Shape letters: t5x_lite/shapes.py.
"""

import functools

import jax
import jax.numpy as jnp

from t5x_lite.decoding.loop import decode_tokens
from t5x_lite.models.layers import shift_right
from t5x_lite.models.registry import family_of_config
from t5x_lite.nn.quant import for_decoding


@functools.lru_cache(maxsize=64)
def generate_fn(config, *, max_new: int, method: str, temperature: float, top_k: int, top_p: float,
                num_beams: int, length_penalty: float, brevity: str):
  """A jitted (params, ids, mask, limit, rng, done, extra) -> (B, max_new) int32 for this config and method.

  `limit` (traced) stops the loop after that many tokens, so `max_new` can be a bucket.
  """
  eos, pad = config.eos_token_id, config.pad_token_id
  family = family_of_config(config)

  def generate_tokens(params, ids, mask, limit, rng, done, extra):
    beams = num_beams if method == "beam" else 1
    params = for_decoding(params, config.dtype)  # quantized weights: dequantized here or per step (nn/quant.py)
    decoder = family.decoder(params, config, ids, mask, beams, max_new, **extra)
    if method == "beam":
      from t5x_lite.decoding.beam_search import beam_search  # pylint: disable=import-outside-toplevel
      first = decoder.first_tokens_R
      first_logits = decoder.first_logits_RV
      # prompt_length=1: T5X's brevity penalty counts the new tokens only, for every family (a left-padded
      # decoder-only bucket would otherwise count its padding).
      return beam_search(decoder.step, decoder.state, decoder.reorder, None if first is None else first[::beams],
                         num_beams=beams, max_new_tokens=max_new, eos_id=eos, pad_id=pad,
                         length_penalty=length_penalty, brevity=brevity, prompt_length=1,
                         vocab_size=config.vocab_size, limit=limit, done_B=done,
                         first_logits_BV=None if first_logits is None else first_logits[::beams])
    # Vocabulary-major logits where the decoder offers them (a tied head; see decode_tokens).
    step = functools.partial(decoder.step, vocab_major=True) if decoder.vocab_major else decoder.step
    return decode_tokens(step, decoder.state, decoder.first_tokens_R, max_new_tokens=max_new, eos_id=eos,
                         pad_id=pad, method=method, temperature=temperature, top_k=top_k, top_p=top_p, rng=rng,
                         first_logits_RV=decoder.first_logits_RV, done_R=done, limit=limit,
                         vocab_major=decoder.vocab_major)

  return jax.jit(generate_tokens)


@functools.lru_cache(maxsize=16)
def score_fn(config):
  """A jitted (params, ids, mask, targets, extra) -> (B,) float32 sum of target log-probabilities (pad targets skipped).

  Encoder-decoder: the decoder reads the start token then targets[:, :-1]. Decoder-only: the targets continue
  the left-padded prompt.
  """
  pad = config.pad_token_id
  forward = family_of_config(config).forward

  def score_targets(params, ids, mask, targets, extra):
    target_mask = (targets != pad).astype(jnp.int32)
    if config.is_encoder_decoder:
      decoder_in = shift_right(targets, config.decoder_start_token_id, pad)
      logits = forward(params, config, ids, mask, decoder_in, None, **extra)
    else:
      P = ids.shape[1]
      full_mask = jnp.concatenate([jnp.ones_like(ids) if mask is None else mask, target_mask], axis=1)
      logits = forward(params, config, jnp.concatenate([ids, targets], axis=1), full_mask, **extra)[:, P - 1:-1]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(token_logp * target_mask, axis=1)

  return jax.jit(score_targets)
