"""Shape buckets: a stream of varied requests compiles a bounded number of programs.

Sizes round up to the next power of two from a floor (batch from 1, lengths from 16), so lengths 1..n touch
about log2(n) shapes. Padding happens in numpy before the jitted call: eager jnp ops on new shapes would
compile too.
"""


def bucket(n: int, floor: int = 16) -> int:
  """Smallest power of two >= max(n, floor)."""
  size = floor
  while size < n:
    size *= 2
  return size
