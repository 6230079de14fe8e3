"""Token choice from logits: greedy, and sampling filtered the way transformers filters it.

Order as in transformers' generate: temperature, then top-k, then top-p. Top-k keeps every token tied with
the k-th largest logit; top-p sorts ascending (stably) and drops tokens whose cumulative probability is at
most 1 - p, so the token that crosses p is kept (and always at least one token).
"""

import jax
import jax.numpy as jnp

from t5x_lite.nn.argmax import argmax


def filter_logits(logits_RV: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
  """float32 logits with filtered-out tokens set to -inf. `top_k=0` and `top_p=1.0` disable those filters."""
  logits = logits_RV.astype(jnp.float32)
  if temperature != 1.0:
    logits = logits / temperature
  if top_k and top_k < logits.shape[-1]:
    kth_largest = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
  if top_p < 1.0:
    logits = jnp.where(outside_top_p(logits, top_p), -jnp.inf, logits)
  return logits


def outside_top_p(logits_RV: jax.Array, top_p) -> jax.Array:
  """(R, V) bool: the tokens top-p filtering drops, for `top_p` a number or per row (R, 1).

  A stable ascending sort, as transformers' sort on CPU (among tied logits the lower index goes first); tokens whose
  cumulative probability is at most 1 - p go, the most likely token always stays.
  """
  order = jnp.argsort(logits_RV, axis=-1, stable=True)
  cumulative = jnp.cumsum(jax.nn.softmax(jnp.take_along_axis(logits_RV, order, axis=-1), axis=-1), axis=-1)
  remove_sorted = (cumulative <= (1.0 - top_p)).at[..., -1].set(False)
  return jnp.zeros_like(remove_sorted).at[jnp.arange(logits_RV.shape[0])[:, None], order].set(remove_sorted)


def choose_tokens(logits_RV: jax.Array, rng: jax.Array | None, *, method: str, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """(R,) int32 next tokens: argmax for "greedy"; for "sample" one draw per row from the filtered softmax.

  Row n draws with `fold_in(rng, n)`, so its tokens do not depend on the batch it shares or its padding.
  """
  if method == "greedy":
    return argmax(logits_RV, axis=-1)
  filtered = filter_logits(logits_RV, temperature=temperature, top_k=top_k, top_p=top_p)
  keys = jax.vmap(lambda n: jax.random.fold_in(rng, n))(jnp.arange(filtered.shape[0]))
  return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
