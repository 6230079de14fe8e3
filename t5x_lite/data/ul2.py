"""UL2's mixture of denoisers: which task an example gets, how long a raw piece each task takes, and the
(inputs, targets) it makes.

Follows the `ul2_objective` listing of the UL2 paper (arXiv 2205.05131, appendix), which composes T5's
preprocessors: R and X are span corruption (`span_corruption.py`) with their own (mean span, density); S is T5's
`prefix_lm`. Each task prepends its mode token(s) to the inputs ([NLU] for R, [NLG] for X, [S2S] for S, as
UL2-20B and Google's own task definitions do), given here as token ids by the caller.

Differences from the appendix code, on purpose:
- The mode tokens count inside the length budget (the appendix does not budget them, so inputs could overflow
  and lose their last sentinel to trimming).
- Each task's raw piece length is the longest that fits *both* budgets (inputs and targets; or the whole
  sequence for a decoder-only model), derived from the exact counts of the mask, so no example is ever trimmed.
- A task whose spans would exceed the sentinels raises at construction (T5 counts down into the vocabulary).
- The task is drawn per example from (seed, example index), not by interleaving per-task shards of the stream
  (`sample_from_datasets`); the task frequencies follow `rates` the same way.
- Default rates are uniform over the seven tasks, the appendix's `rates=None`. I could not read the paper's
  stated proportions; other ports use S = 34% (flashT5) or 50% (levanter, UL2R).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import numpy as np

from t5x_lite.data.span_corruption import Seed, corrupted_lengths, noise_counts, span_corruption


@dataclasses.dataclass(frozen=True)
class Denoiser:
  """One task of the mixture.

  `mean_noise_span_length=None` marks the sequential task (S, T5's `prefix_lm`): the prefix is the input, the
  rest the target, the prefix length uniform in [lo, L-1] with lo = max(1, round((1 - 2 d)(L - 1))) for
  `noise_density` d <= 0.5 (d = 0.5: uniform over 1..L-1). Otherwise span corruption at
  (`noise_density`, `mean_noise_span_length`).
  """
  mode_ids: tuple[int, ...]
  noise_density: float
  mean_noise_span_length: float | None = None
  name: str = ""

  def __post_init__(self):
    object.__setattr__(self, "mode_ids", tuple(int(i) for i in self.mode_ids))
    if self.is_prefix_lm and not 0.0 <= self.noise_density <= 0.5:
      raise ValueError(f"prefix-LM noise_density must lie in [0, 0.5], got {self.noise_density}")

  @property
  def is_prefix_lm(self) -> bool:
    return self.mean_noise_span_length is None

  def lengths(self, raw_length: int) -> tuple[int, int]:
    """The longest (inputs, targets) this task can make of `raw_length` tokens, mode tokens and EOS included."""
    if self.is_prefix_lm:
      # Prefix and suffix each take at most raw - 1 tokens (both are non-empty from 2 tokens on).
      longest = max(raw_length - 1, 1) if raw_length else 0
      return len(self.mode_ids) + longest + 1, longest + 1
    enc, dec = corrupted_lengths(raw_length, noise_density=self.noise_density,
                                 mean_noise_span_length=self.mean_noise_span_length)
    return len(self.mode_ids) + enc, dec

  def total_length(self, raw_length: int) -> int:
    """inputs + targets for `raw_length` tokens (the same for every draw: prefix + suffix = raw)."""
    if self.is_prefix_lm:
      return len(self.mode_ids) + raw_length + 2
    return sum(self.lengths(raw_length))


def ul2_denoisers(r_mode_ids: Sequence[int], x_mode_ids: Sequence[int],
                  s_mode_ids: Sequence[int]) -> tuple[Denoiser, ...]:
  """The UL2 paper's seven tasks: R (mean 3 and 8 at 15%), X (3 and 8 at 50%, 64 at 15% and 50%), S (prefix
  LM, T5's `prefix_lm` density 0.5). The mode ids are the tokens for [NLU], [NLG], [S2S]."""
  r, x, s = tuple(r_mode_ids), tuple(x_mode_ids), tuple(s_mode_ids)
  return (Denoiser(r, 0.15, 3.0, "R-3-0.15"), Denoiser(r, 0.15, 8.0, "R-8-0.15"),
          Denoiser(x, 0.5, 3.0, "X-3-0.5"), Denoiser(x, 0.5, 8.0, "X-8-0.5"),
          Denoiser(x, 0.15, 64.0, "X-64-0.15"), Denoiser(x, 0.5, 64.0, "X-64-0.5"),
          Denoiser(s, 0.5, None, "S"))


def _largest_fitting(fits) -> int:
  """Largest t >= 0 with fits(t), for a predicate that is true up to some t and false after."""
  if not fits(0):
    return -1
  hi = 1
  while fits(hi):
    hi *= 2
    if hi > 2**40:
      raise ValueError("the length budget never binds for this task")
  lo = hi // 2  # fits(lo), not fits(hi)
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  return lo


@dataclasses.dataclass(frozen=True)
class Mixture:
  """The denoisers, their rates and the length budget they must fit.

  Budget: `inputs_length` and `targets_length` for an encoder-decoder (each includes EOS; the inputs include
  the mode tokens), or `length` alone for a decoder-only model, where inputs and targets are concatenated
  (`packing.decoder_only_example`) and together must fit. `rates` (any non-negative weights) default to
  uniform. Sentinels count down from `first_sentinel_id`; `num_sentinels` of them may be used.

  After construction, `raw_lengths[i]` is the number of raw tokens task i takes from a document: the longest
  piece whose inputs and targets fit the budget whatever the draw (span corruption: T5's `random_spans_helper`
  generalised to both budgets and the mode tokens; S: min(inputs_length - mode tokens, targets_length), or
  length - mode tokens - 2 decoder-only). `probabilities` are the normalised rates.
  """
  denoisers: tuple[Denoiser, ...]
  first_sentinel_id: int
  inputs_length: int | None = None
  targets_length: int | None = None
  length: int | None = None
  rates: tuple[float, ...] | None = None
  num_sentinels: int = 100
  eos_id: int = 1
  raw_lengths: tuple[int, ...] = dataclasses.field(init=False)
  probabilities: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    object.__setattr__(self, "denoisers", tuple(self.denoisers))
    if not self.denoisers:
      raise ValueError("a mixture needs at least one denoiser")
    encdec = self.inputs_length is not None or self.targets_length is not None
    if encdec == (self.length is not None) or (encdec and None in (self.inputs_length, self.targets_length)):
      raise ValueError("give either inputs_length and targets_length (encoder-decoder) or length (decoder-only)")
    rates = np.ones(len(self.denoisers)) if self.rates is None else np.asarray(self.rates, np.float64)
    if rates.shape != (len(self.denoisers),) or (rates < 0).any() or rates.sum() <= 0:
      raise ValueError(f"rates must be {len(self.denoisers)} non-negative weights, not all zero; got {self.rates}")
    if self.rates is not None:
      object.__setattr__(self, "rates", tuple(float(r) for r in self.rates))
    object.__setattr__(self, "probabilities", rates / rates.sum())
    object.__setattr__(self, "raw_lengths", tuple(self._raw_length(d) for d in self.denoisers))
    for d, raw in zip(self.denoisers, self.raw_lengths):
      if raw < 1:
        raise ValueError(f"task {d.name or d}: the budget leaves no room for a single raw token")
      if not d.is_prefix_lm:
        spans = noise_counts(raw, d.noise_density, d.mean_noise_span_length)[1]
        if spans > self.num_sentinels:
          raise ValueError(f"task {d.name or d}: a full piece of {raw} tokens has {spans} noise spans but only "
                           f"{self.num_sentinels} sentinels exist; lower the budget or provide more sentinels")

  @property
  def is_decoder_only(self) -> bool:
    return self.length is not None

  def fits(self, inputs_length: int, targets_length: int) -> bool:
    if self.is_decoder_only:
      return inputs_length + targets_length <= self.length
    return inputs_length <= self.inputs_length and targets_length <= self.targets_length

  def _raw_length(self, d: Denoiser) -> int:
    if self.is_decoder_only:
      return _largest_fitting(lambda t: d.total_length(t) <= self.length)
    # The lengths are non-decreasing in the raw length, so the largest fitting piece is well defined.
    return _largest_fitting(lambda t: self.fits(*d.lengths(t)))


class Example(NamedTuple):
  """One denoising example: int32 `inputs` and `targets` (EOS appended to both, mode tokens leading the
  inputs), the index of its task in the mixture, and how many raw tokens it consumed."""
  inputs: np.ndarray
  targets: np.ndarray
  task: int
  num_raw_tokens: int


def prefix_lm(tokens, *, noise_density: float = 0.5, seed: Seed, eos_id: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """T5's `prefix_lm` split (`random_prefix_noise_mask`) -> (prefix + EOS, suffix + EOS), int32.

  The prefix length is uniform in [lo, L-1] with lo = min(L-1, max(1, round((1 - 2 d)(L - 1)))); a single
  token becomes the target of an empty prefix.
  """
  tokens_L = np.asarray(tokens).astype(np.int32)
  if tokens_L.ndim != 1:
    raise ValueError(f"tokens must be 1-D, got shape {tokens_L.shape}")
  n = len(tokens_L)
  longest = max(n - 1, 0)
  shortest = min(longest, max(1, round((1 - 2 * noise_density) * longest)))
  split = int(np.random.default_rng(seed).integers(shortest, longest + 1))
  eos = np.array([eos_id], np.int32)
  return np.concatenate([tokens_L[:split], eos]), np.concatenate([tokens_L[split:], eos])


def _seed_tuple(seed: Seed) -> tuple[int, ...]:
  return (int(seed),) if np.ndim(seed) == 0 else tuple(int(s) for s in seed)


def ul2_example(tokens, mixture: Mixture, *, seed: Seed) -> Example:
  """Draws a task for `seed`, takes the first `mixture.raw_lengths[task]` of `tokens` and denoises them.

  The task and the task's own randomness both come from `seed` (e.g. (run seed, example index)), so the same
  seed gives the same example. Tokens past the task's raw length are not used (`Example.num_raw_tokens` says
  how many were); `ul2_examples` covers a whole document.
  """
  tokens_L = np.asarray(tokens).astype(np.int32)
  if tokens_L.ndim != 1 or len(tokens_L) == 0:
    raise ValueError(f"tokens must be a non-empty 1-D sequence, got shape {tokens_L.shape}")
  rng = np.random.default_rng(_seed_tuple(seed))
  task = int(rng.choice(len(mixture.denoisers), p=mixture.probabilities))
  task_seed = int(rng.integers(2**63))
  d = mixture.denoisers[task]
  piece = tokens_L[:mixture.raw_lengths[task]]
  if d.is_prefix_lm:
    inputs, targets = prefix_lm(piece, noise_density=d.noise_density, seed=task_seed, eos_id=mixture.eos_id)
  else:
    inputs, targets = span_corruption(piece, first_sentinel_id=mixture.first_sentinel_id,
                                      noise_density=d.noise_density,
                                      mean_noise_span_length=d.mean_noise_span_length, seed=task_seed,
                                      num_sentinels=mixture.num_sentinels, eos_id=mixture.eos_id)
  inputs = np.concatenate([np.asarray(d.mode_ids, np.int32), inputs])
  return Example(inputs, targets, task, len(piece))


def ul2_examples(tokens, mixture: Mixture, *, seed: Seed) -> list[Example]:
  """Cuts a whole document into consecutive pieces, each with its own task, and denoises them.

  Piece k is `ul2_example(rest of the document, seed=(*seed, k))`, so its length is its task's raw length (the
  last piece may be shorter). Unlike T5, which concatenates 128 documents before splitting, pieces never cross
  documents; packing fills the rows instead. An empty document gives no examples.
  """
  tokens_L = np.asarray(tokens).astype(np.int32)
  base = _seed_tuple(seed)
  examples, offset = [], 0
  while offset < len(tokens_L):
    ex = ul2_example(tokens_L[offset:], mixture, seed=(*base, len(examples)))
    examples.append(ex)
    offset += ex.num_raw_tokens
  return examples
