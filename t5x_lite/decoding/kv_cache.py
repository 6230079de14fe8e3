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
  """Self-attention caches indexed by a clock g: clock value c lives in slot c % n of a ring of n slots.

  A static batch's cache is one ring of `length` slots (its length: it never wraps), read as it lies. In-flight
  slots share a clock that runs on past any request, and a step should read only the keys its rows still need (a
  decoding step reads its cache once, so its cost follows the keys it reads: t5-v1_1-small, 8 rows, on a
  memory-bound 2-core host, 9.2 / 11.6 / 12.5 ms per step over 64 / 128 / 256 slots). So they keep one ring per
  attention span in `spans` (ascending, the last `length`): every step writes its keys into each ring (one slot
  each, cheap) and reads the ring of its span whole, in place, as a static batch reads its cache. A ring of n
  slots holds the last n clock values, so any span that covers every row's keys reads them all.

  Why not one ring and a window: a ring followed by a copy of itself (slot s also written at length + s) holds the
  last `span` clock values as one slice wherever the clock stands, but XLA:CPU copies a dynamic slice before the
  attention matmul instead of reading it in place (8 layers of k/v attention over 8 rows, t5-v1_1-small's heads:
  0.62 ms per step over a 64-slot window of a mirrored 256-slot ring against 0.36 ms for rings of 32-256 slots
  written each step and the 64-slot one read; 3.6 against 1.7 ms at 256), and a static slice was copied too. The
  rings take the same memory as the mirror (32 + 64 + 128 + 256 slots against 2 x 256).
  """
  length: int
  spans: tuple[int, ...] = ()


def ring_zeros(batch: int, kv_heads: int, ring: Ring, head_dim: int, dtype) -> jax.Array | tuple[jax.Array, ...]:
  """One layer's caches: an array for a single ring, else a tuple of arrays, one per span."""
  if not ring.spans:
    return zeros(batch, kv_heads, ring.length, head_dim, dtype)
  return tuple(zeros(batch, kv_heads, n, head_dim, dtype) for n in ring.spans)


def _as_tuple(rings) -> tuple[jax.Array, ...]:
  """A layer's rings (an array, or a tuple of arrays) as a tuple."""
  return rings if isinstance(rings, tuple) else (rings,)


def _each(rings, fn):
  """`fn` over a layer's rings, the same structure back."""
  return tuple(fn(r) for r in rings) if isinstance(rings, tuple) else fn(rings)


def ring_write(rings, new_BTKH: jax.Array, g: jax.Array):
  """Writes one new position (B, 1, K, H) at clock g: slot g % n of each ring of n slots, in place."""
  return _each(rings, lambda cache: write(cache, new_BTKH, jnp.mod(g, cache.shape[-2])))


def ring_read(rings, span: int) -> jax.Array:
  """The ring of `span` slots (stored layout), to be read whole."""
  for cache in _as_tuple(rings):
    if cache.shape[-2] == span:
      return cache
  raise ValueError(f"no ring of {span} slots; the layer keeps rings of {[c.shape[-2] for c in _as_tuple(rings)]}")


def ring_put(rings, rows_A: jax.Array, new_AKSH: jax.Array, batch: int, kv_heads: int, clocks_S: jax.Array):
  """`put` of S positions at clock values `clocks_S` (consecutive, the last the latest) into each ring: a ring of
  n < S slots takes the last n of them (the earlier ones would be overwritten there)."""
  S = clocks_S.shape[0]

  def into(cache):
    first = max(0, S - cache.shape[-2])
    return put(cache, rows_A, new_AKSH[:, :, first:], batch, kv_heads, jnp.mod(clocks_S[first:], cache.shape[-2]))

  return _each(rings, into)


def window_clocks(g: jax.Array, span: int) -> jax.Array:
  """(span,) int32: the clock value each slot of a ring of `span` slots holds after step g's write (the latest
  value <= g in that slot; negative where nothing was written yet, in a ring that starts at clock 0)."""
  return g - jnp.mod(g - jnp.arange(span, dtype=jnp.int32), span)


def window_valid(valid_BS: jax.Array, clocks: jax.Array) -> jax.Array:
  """A per-row mask (B, length) indexed like the ring of `length` slots, laid over a ring of fewer slots whose
  clock values are `clocks` (the mask itself when the ring is that long)."""
  length = valid_BS.shape[1]
  return valid_BS if clocks.shape[0] == length else jnp.take(valid_BS, jnp.mod(clocks, length), axis=1)
