"""Boolean attention masks, True where a query may attend to a key.

Every builder returns a mask that broadcasts against attention logits of shape (B, N, T, S); combine them
with `&`. Windows and causality are index based (sequence slots, not position ids), as transformers does.
"""

import jax
import jax.numpy as jnp


def key_padding_mask(key_valid_BS: jax.Array) -> jax.Array:
  """(B, S) of 1/True for real keys -> (B, 1, 1, S)."""
  return key_valid_BS.astype(bool)[:, None, None, :]


def causal_mask(q_index_BT: jax.Array, k_index_BS: jax.Array) -> jax.Array:
  """Keys at or before the query's slot -> (B, 1, T, S)."""
  return (k_index_BS[:, None, None, :] <= q_index_BT[:, None, :, None])


def sliding_window_mask(q_index_BT: jax.Array, k_index_BS: jax.Array, *, left: int, right: int) -> jax.Array:
  """Keys whose offset `k - q` lies in [-left, +right] -> (B, 1, T, S).

  A causal window of w tokens including the query is `left=w-1, right=0`.
  """
  offset = k_index_BS[:, None, None, :] - q_index_BT[:, None, :, None]
  return (offset >= -left) & (offset <= right)


def segment_mask(q_segment_BT: jax.Array, k_segment_BS: jax.Array) -> jax.Array:
  """Packed examples attend only within their own segment; segment 0 is padding -> (B, 1, T, S)."""
  same = q_segment_BT[:, None, :, None] == k_segment_BS[:, None, None, :]
  return same & (k_segment_BS[:, None, None, :] != 0)


def combine(*masks: jax.Array | None) -> jax.Array | None:
  """AND of the masks that are not None (None when all are)."""
  out = None
  for m in masks:
    if m is not None:
      out = m if out is None else out & m
  return out


def slot_index(batch: int, length: int, offset: int | jax.Array = 0) -> jax.Array:
  """(B, length) sequence slot indices starting at `offset`."""
  return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32)[None, :] + offset, (batch, length))


def join_keys(first: jax.Array | None, second: jax.Array | None, *, sizes: tuple[int, int] | None = None) -> jax.Array:
  """Masks over two key sets read by one softmax (keys `first` then `second`), (..., T, S1) and (..., T, S2) ->
  (..., T, S1 + S2). A None mask allows every key of its set; `sizes` (S1, S2) are then needed."""
  if first is None or second is None:
    if sizes is None:
      raise ValueError("join_keys needs the key counts when a mask is None")
    like = first if first is not None else second
    full = jnp.ones(like.shape[:-1] + (sizes[0] if first is None else sizes[1],), bool)
    first, second = (full, second) if first is None else (first, full)
  lead = jnp.broadcast_shapes(first.shape[:-1], second.shape[:-1])
  return jnp.concatenate([jnp.broadcast_to(first, lead + first.shape[-1:]),
                          jnp.broadcast_to(second, lead + second.shape[-1:])], axis=-1)
