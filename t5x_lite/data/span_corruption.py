"""T5 span corruption: the random-spans noise mask, sentinel substitution and the length arithmetic.

Owns the algorithm of T5's `random_spans_noise_mask`, `noise_span_to_unique_sentinel` and
`random_spans_helper` (google-research/text-to-text-transfer-transformer, `t5/data/preprocessors.py`),
reimplemented in numpy with a seeded `np.random.Generator`. The *distribution* of masks matches T5's; the bits
do not (T5 draws from TensorFlow's stateless Philox generator).

One place counts noise tokens and spans (`noise_counts`), and both the mask and the length arithmetic read
it, so "568 raw tokens give exactly 512 inputs and 114 targets" holds by construction. Counts use Python's
`round` on float64 (round half to even, as `tf.round`); T5 itself rounds in float32 in the mask and in float64
in the helper, which can differ on exact .5 products. We keep one rule for both.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np

# Anything `np.random.default_rng` accepts: an int, or a sequence of ints such as (seed, example_index).
Seed = Union[int, Sequence[int]]


def noise_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
  """(noise tokens, noise spans) that `noise_mask` puts in a sequence of `length` tokens.

  T5's rule: noise = round_half_even(length * density) clipped to [1, length - 1], spans =
  max(1, round_half_even(noise / mean)), at most the number of non-noise tokens. Sequences shorter than 2 tokens
  and density 0 get no noise (T5 pads the length to 2, then cuts the mask back, leaving `[False]` for one token).
  """
  _check_rates(noise_density, mean_noise_span_length)
  if length < 2 or noise_density == 0:
    return 0, 0
  num_noise = min(max(round(length * noise_density), 1), length - 1)
  num_spans = max(round(num_noise / mean_noise_span_length), 1)
  # Each noise span needs a non-empty non-noise run before it. Only very short pieces at high density hit this
  # (3 tokens at r=0.5, mean 1); T5 would leave an empty run there, silently merging two spans.
  return num_noise, min(num_spans, length - num_noise)


def _check_rates(noise_density: float, mean_noise_span_length: float) -> None:
  if not 0.0 <= noise_density <= 1.0:
    raise ValueError(f"noise_density must lie in [0, 1], got {noise_density}")
  if mean_noise_span_length < 1.0:
    raise ValueError(f"mean_noise_span_length must be >= 1 (a span holds at least one token), "
                     f"got {mean_noise_span_length}")


def _random_composition(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
  """`parts` positive integers summing to `total`, every one of the C(total-1, parts-1) compositions equally
  likely -> int64 (parts,).

  A composition is fixed by which `parts - 1` of the `total - 1` gaps between items start a new part; T5 shuffles
  a 0/1 vector of gap flags, we draw the same uniform subset of gaps directly.
  """
  cuts = np.sort(rng.choice(total - 1, size=parts - 1, replace=False)) + 1
  return np.diff(np.concatenate([[0], cuts, [total]]))


def noise_mask(length: int, *, noise_density: float, mean_noise_span_length: float, seed: Seed) -> np.ndarray:
  """T5's `random_spans_noise_mask` without the random roll -> bool (length,), True on noise tokens.

  The noise tokens (count from `noise_counts`) are cut into `num_spans` positive runs, and the other tokens
  into as many positive runs, each cut uniform over all compositions and independent of the other; runs then
  alternate non-noise, noise, non-noise, ..., so the mask starts with non-noise and ends with noise. The same
  `seed` gives the same mask.
  """
  if length < 0:
    raise ValueError(f"length must be >= 0, got {length}")
  num_noise, num_spans = noise_counts(length, noise_density, mean_noise_span_length)
  if num_noise == 0:
    return np.zeros(length, dtype=bool)
  rng = np.random.default_rng(seed)
  # Drawn in T5's order: the noise segmentation first, then the non-noise one.
  noise_runs = _random_composition(num_noise, num_spans, rng)
  nonnoise_runs = _random_composition(length - num_noise, num_spans, rng)
  run_lengths = np.stack([nonnoise_runs, noise_runs], axis=1).reshape(-1)
  return np.repeat(np.tile([False, True], num_spans), run_lengths)


def _noise_run_starts(mask: np.ndarray) -> np.ndarray:
  """True at the first token of every noise run -> bool (L,)."""
  previous = np.concatenate([[False], mask[:-1]])
  return mask & ~previous


def span_corruption(tokens, *, first_sentinel_id: int, noise_density: float = 0.15,
                    mean_noise_span_length: float = 3.0, seed: Seed, num_sentinels: int = 100,
                    eos_id: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """T5's span corruption of one token sequence -> (inputs int32 (L - n + k + 1,), targets int32 (n + k + 1,)).

  With n noise tokens in k spans (from `noise_mask`) and sentinels S_i = first_sentinel_id - i (`<extra_id_i>`,
  counting down as seqio's reversed extra ids do):
    inputs  = c_0 S_0 c_1 S_1 ... c_{k-1} S_{k-1} EOS   (c_i: the non-noise runs)
    targets = S_0 s_0 S_1 s_1 ... S_{k-1} s_{k-1} EOS   (s_i: the noise runs)
  so splitting both at the sentinels and interleaving gives `tokens` back (provided `tokens` holds no sentinel
  ids). EOS is appended after corruption, so it is never masked. More than `num_sentinels` spans raises
  ValueError: T5 would count down into ordinary vocabulary.
  """
  tokens_L = np.asarray(tokens)
  if tokens_L.ndim != 1:
    raise ValueError(f"tokens must be 1-D, got shape {tokens_L.shape}")
  if tokens_L.size and not np.issubdtype(tokens_L.dtype, np.integer):
    raise ValueError(f"tokens must be integer ids, got dtype {tokens_L.dtype}")
  tokens_L = tokens_L.astype(np.int32)
  mask_L = noise_mask(len(tokens_L), noise_density=noise_density, mean_noise_span_length=mean_noise_span_length,
                      seed=seed)
  starts_L = _noise_run_starts(mask_L)
  num_spans = int(starts_L.sum())
  if num_spans > num_sentinels:
    raise ValueError(f"{num_spans} noise spans need more than the {num_sentinels} sentinels available "
                     f"(length={len(tokens_L)}, noise_density={noise_density}, mean={mean_noise_span_length}); "
                     "shorten the sequence, lower the density or raise num_sentinels")
  sentinel_L = first_sentinel_id + 1 - np.cumsum(starts_L)  # S_i on the first token of span i
  with_sentinels_L = np.where(starts_L, sentinel_L, tokens_L).astype(np.int32)
  eos = np.array([eos_id], np.int32)
  inputs = with_sentinels_L[~mask_L | starts_L]  # each noise span collapses to its sentinel
  # Targets: the noise runs, each preceded by its sentinel.
  sentinel_first = np.stack([sentinel_L, tokens_L], axis=1).astype(np.int32)
  keep = np.stack([starts_L, mask_L], axis=1)
  targets = sentinel_first[keep]
  return np.concatenate([inputs, eos]), np.concatenate([targets, eos])


def corrupted_lengths(raw_length: int, *, noise_density: float = 0.15,
                      mean_noise_span_length: float = 3.0) -> tuple[int, int]:
  """(inputs, targets) lengths, EOS included, that `span_corruption` gives `raw_length` tokens.

  Deterministic: the counts depend only on the length. Both are non-decreasing in `raw_length`.
  """
  num_noise, num_spans = noise_counts(raw_length, noise_density, mean_noise_span_length)
  return raw_length - num_noise + num_spans + 1, num_noise + num_spans + 1


def span_corruption_lengths(inputs_length: int, *, noise_density: float = 0.15,
                            mean_noise_span_length: float = 3.0) -> tuple[int, int]:
  """T5's `random_spans_helper` (one sentinel per span, EOS counted) -> (raw_tokens_length, targets_length).

  `raw_tokens_length` is the longest raw piece whose corrupted inputs (EOS included) fit `inputs_length`;
  `targets_length` is the length of its targets, EOS included: 512 -> (568, 114) at the defaults, and 568 raw
  tokens give inputs of exactly 512 and targets of exactly 114. As in T5, at density 0.5 the piece is shortened
  by one token when the targets would exceed the inputs (so both can share one round length).

  T5's helper counts with bare rounding; we count as the mask does (`noise_counts`: at least one noise token
  and one span). The two agree whenever T5's arithmetic describes its own mask; where it does not (pieces of a
  few tokens, or a mean span far above the noise count, e.g. UL2's X-denoiser at mean 64 and density 0.15)
  T5's figures undercount, so T5 would truncate targets, and ours stay exact. At density 0.5 T5 also takes one
  off the targets without recounting them for the shorter piece, which overstates them by one where that piece
  loses a span as well (e.g. 43 -> T5 (62, 43), ours (62, 42): 62 raw tokens give 42 targets).
  """
  if inputs_length < 1:
    raise ValueError(f"inputs_length must be >= 1 (EOS alone takes one), got {inputs_length}")

  def inputs_fit(t):
    return corrupted_lengths(t, noise_density=noise_density,
                             mean_noise_span_length=mean_noise_span_length)[0] <= inputs_length

  # T5 starts one below the budget (a piece never shrinks under corruption) and grows while the next fits;
  # the lengths are non-decreasing in the piece length, so this finds the longest piece that fits.
  raw = inputs_length - 1
  while inputs_fit(raw + 1):
    raw += 1
  enc, dec = corrupted_lengths(raw, noise_density=noise_density, mean_noise_span_length=mean_noise_span_length)
  if noise_density == 0.5 and dec > enc:
    raw -= 1
    dec = corrupted_lengths(raw, noise_density=noise_density, mean_noise_span_length=mean_noise_span_length)[1]
  return raw, dec
