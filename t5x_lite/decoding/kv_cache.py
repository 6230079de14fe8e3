"""The storage layout of decoding KV caches: head-major (B, K, S, H), with size-1 batch and head axes dropped.

Why drop them: XLA removes size-1 axes from a dot's operands, so a (1, K, S, H) or (B, 1, S, H) cache reaches
the attention matmul through a reshape. XLA:CPU then fused the step's in-place cache write into that reshape
for the matmul's read, in addition to the write itself, and copied the whole cache to feed both, at every step
(Gemma 3 270M shape, multi-query K = 1, batch 8: 113 MB of copies per step, 10 of 94 ms; t5-v1_1-small at
batch 1 likewise). Stored without those axes, the written cache is the matmul's operand as it lies.

Every cache array keeps the batch axis first when batch > 1, so beam search reorders rows along axis 0.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


def stored_shape(batch: int, kv_heads: int, length: int, head_dim: int) -> tuple[int, ...]:
  return (*(d for d in (batch, kv_heads) if d > 1), length, head_dim)


def zeros(batch: int, kv_heads: int, length: int, head_dim: int, dtype) -> jax.Array:
  return jnp.zeros(stored_shape(batch, kv_heads, length, head_dim), dtype)


def store(x_BKSH: jax.Array) -> jax.Array:
  """(B, K, S, H) -> the stored layout."""
  return x_BKSH.reshape(stored_shape(*x_BKSH.shape))


def view(cache: jax.Array, batch: int, kv_heads: int) -> jax.Array:
  """The stored cache as (B, K, S, H) (a reshape XLA folds into the attention matmul)."""
  return cache.reshape(batch, kv_heads, *cache.shape[-2:])


def write(cache: jax.Array, new_BTKH: jax.Array, index: jax.Array) -> jax.Array:
  """Writes T new positions (B, T, K, H) at slot `index` (scalar), in place."""
  new = store(new_BTKH.transpose(0, 2, 1, 3))
  return jax.lax.dynamic_update_slice(cache, new.astype(cache.dtype), (0,) * (cache.ndim - 2) + (index, 0))


def take_rows(cache: jax.Array, rows_R: jax.Array, batch: int, kv_heads: int) -> jax.Array:
  """The cache of rows `rows_R` (R indices into the `batch` rows), stored for R rows."""
  return store(jnp.take(view(cache, batch, kv_heads), rows_R, axis=0))


def repeat_rows(cache: jax.Array, times: int, batch: int, kv_heads: int) -> jax.Array:
  """Each of the `batch` rows repeated `times` times in place (row b -> rows b*times ... b*times + times-1)."""
  return store(jnp.repeat(view(cache, batch, kv_heads), times, axis=0))


def put(cache: jax.Array, rows_A: jax.Array, new_AKSH: jax.Array, batch: int, kv_heads: int,
        slots_S: jax.Array | None = None) -> jax.Array:
  """The cache with rows `rows_A` replaced: wholly by `new_AKSH` (its S the cache's length), or at slots `slots_S`
  only (distinct indices along the cache's length). Rows numbered `batch` or more are dropped (admission batches
  padded to a bucket)."""
  full = view(cache, batch, kv_heads)
  new = new_AKSH.astype(cache.dtype)
  if slots_S is None:
    return store(full.at[rows_A].set(new, mode="drop"))
  # Indices separated by a slice: the indexed block is (A, S, K, H), rows and slots first.
  return store(full.at[rows_A[:, None], :, slots_S[None, :]].set(new.transpose(0, 2, 1, 3), mode="drop"))


class Ring(NamedTuple):
  """The self-attention caches of in-flight slots: rings of `length` slots indexed by a clock g shared by every row
  (clock value c lives in slot c % length), each followed by a copy of its first `mirror` slots (slot s < mirror is
  also written at length + s). With mirror == length a step reads the last `span` clock values as one contiguous
  slice wherever the clock stands, instead of the whole ring: a decoding step reads its cache once, so its cost
  follows the keys it reads (t5-v1_1-small, 8 rows, on a memory-bound 2-core host: 9.2 / 11.6 / 12.5 ms per step
  over 64 / 128 / 256 slots). The slice is read with a dynamic offset even for the whole ring: XLA:CPU copied a
  static slice before the attention matmul (in isolation, 8 layers of k/v attention over 8 rows: 10.3 ms per step
  over a static 256-slot slice of a 384-slot cache, against 2.9 ms for a 256-slot cache read in place and 1.4 ms
  for a 64-slot dynamic slice).
  A static batch's cache is Ring(its length): no mirror, read as it lies."""
  length: int
  mirror: int = 0


def ring_zeros(batch: int, kv_heads: int, ring: Ring, head_dim: int, dtype) -> jax.Array:
  return zeros(batch, kv_heads, ring.length + ring.mirror, head_dim, dtype)


def ring_write(cache: jax.Array, new_BTKH: jax.Array, g: jax.Array, ring: Ring) -> jax.Array:
  """Writes one new position (B, 1, K, H) at clock g: slot g % length, and its mirror slot when it has one."""
  slot = jnp.mod(g, ring.length)
  if not ring.mirror:
    return write(cache, new_BTKH, slot)
  # One scatter for both slots: with two in-place writes XLA fused the window's read with the second (reading the
  # cache between them) and copied the whole cache twice per layer and step to keep both versions.
  new = store(new_BTKH.transpose(0, 2, 1, 3)).astype(cache.dtype)
  at = jnp.stack([slot, jnp.where(slot < ring.mirror, slot + ring.length, slot)])
  return cache.at[..., at, :].set(jnp.concatenate([new, new], axis=-2))


def ring_put(cache: jax.Array, rows_A: jax.Array, new_AKSH: jax.Array, batch: int, kv_heads: int,
             slots_S: jax.Array, ring: Ring) -> jax.Array:
  """`put` at ring slots `slots_S` (in [0, length)) and at their mirror slots."""
  cache = put(cache, rows_A, new_AKSH, batch, kv_heads, slots_S)
  if ring.mirror:  # slots without a mirror point past the cache: dropped
    cache = put(cache, rows_A, new_AKSH, batch, kv_heads,
                jnp.where(slots_S < ring.mirror, slots_S + ring.length, ring.length + ring.mirror))
  return cache


def window_clocks(g: jax.Array, ring: Ring, span: int) -> jax.Array:
  """(span,) int32: the clock value each slot of `ring_window(.., g, ring, span)` holds (after step g's write):
  g - span + 1 .. g in order (a mirrored ring), or for a ring read as it lies each slot's latest value <= g."""
  if not ring.mirror:
    return g - jnp.mod(g - jnp.arange(span, dtype=jnp.int32), span)
  return g - span + 1 + jnp.arange(span, dtype=jnp.int32)


def window_valid(valid_BS: jax.Array, clocks: jax.Array, ring: Ring) -> jax.Array:
  """A per-slot (B, length) mask, indexed like the ring, over the keys `window_clocks` gave (as they are read)."""
  return valid_BS if not ring.mirror else jnp.take(valid_BS, jnp.mod(clocks, ring.length), axis=1)


def ring_window(cache: jax.Array, g: jax.Array, ring: Ring, span: int) -> jax.Array:
  """The stored cache over `span` slots: a ring without mirror as it lies (span == length), else the clock values
  g - span + 1 .. g as one slice (span <= mirror + 1)."""
  if not ring.mirror:
    if span != ring.length:
      raise ValueError(f"a ring without mirror is read whole ({ring.length} slots), not over {span}")
    return cache
  if span > ring.mirror + 1:
    raise ValueError(f"a window of {span} slots needs a mirror of at least {span - 1}, the ring has {ring.mirror}")
  start = jnp.mod(g - span + 1, ring.length)
  return jax.lax.dynamic_slice_in_dim(cache, start, span, axis=cache.ndim - 2)
