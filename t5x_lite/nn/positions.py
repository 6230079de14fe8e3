"""Position encodings: T5's relative position buckets and bias, and rotary embeddings (RoPE)."""

import math

import jax
import jax.numpy as jnp


def relative_position_bucket(relative_position: jax.Array, *, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> jax.Array:
  """T5's bucket of `key_position - query_position` (int32 in [0, num_buckets)).

  Small distances get a bucket each; larger ones share logarithmically wider buckets up to `max_distance`.
  In causal mode future keys fall into bucket 0.
  """
  rel = relative_position.astype(jnp.int32)
  buckets = jnp.zeros_like(rel)
  if bidirectional:
    num_buckets //= 2
    buckets = buckets + (rel > 0).astype(jnp.int32) * num_buckets
    rel = jnp.abs(rel)
  else:
    rel = jnp.maximum(-rel, 0)
  max_exact = num_buckets // 2
  is_small = rel < max_exact
  # max(rel, 1) keeps log() finite in the branch `where` discards, so no NaN reaches gradients.
  relf = jnp.maximum(rel, 1).astype(jnp.float32)
  large = max_exact + (jnp.log(relf / max_exact) / math.log(max_distance / max_exact)
                       * (num_buckets - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return buckets + jnp.where(is_small, rel, large)


def relative_position_bias(table_XN: jax.Array, q_position_BT: jax.Array, k_position_BS: jax.Array, *,
                           bidirectional: bool, max_distance: int) -> jax.Array:
  """Bias added to attention logits, (B, N, T, S), from a (num_buckets, N) table."""
  rel_BTS = k_position_BS[:, None, :] - q_position_BT[:, :, None]
  bucket_BTS = relative_position_bucket(rel_BTS, bidirectional=bidirectional, num_buckets=table_XN.shape[0],
                                        max_distance=max_distance)
  return jnp.transpose(table_XN[bucket_BTS], (0, 3, 1, 2))


def rope_inverse_frequencies(head_dim: int, theta: float, scaling_factor: float = 1.0) -> jax.Array:
  """(H/2,) float32 inverse frequencies; linear rope scaling divides them by `scaling_factor`."""
  exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  return 1.0 / (theta ** exponents) / scaling_factor


def apply_rope(x_BTNH: jax.Array, position_BT: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotate-half RoPE (not interleaved): halves [x1, x2] -> x*cos + [-x2, x1]*sin.

  cos and sin are computed in float32 and cast to `x`'s dtype before use, as transformers does.
  """
  freqs_BTh = position_BT.astype(jnp.float32)[..., None] * inv_freq
  angles_BTH = jnp.concatenate([freqs_BTh, freqs_BTh], axis=-1)
  cos = jnp.cos(angles_BTH).astype(x_BTNH.dtype)[:, :, None, :]
  sin = jnp.sin(angles_BTH).astype(x_BTNH.dtype)[:, :, None, :]
  half = x_BTNH.shape[-1] // 2
  rotated = jnp.concatenate([-x_BTNH[..., half:], x_BTNH[..., :half]], axis=-1)
  return x_BTNH * cos + rotated * sin
