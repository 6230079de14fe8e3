"""t5x_lite.data: span corruption, its lengths, the UL2 mixture and packing, checked against T5/seqio's rules.

The invariants and golden numbers are those of ../shared/reference/ul2.md §5 (T5's preprocessors_test.py and
seqio's feature-converter docstrings). Random masks are checked by exact counts and by chi-square tests.
"""

import itertools
import math

import numpy as np
import pytest

from t5x_lite import data

FIRST_SENTINEL = 32099  # <extra_id_0> of the T5 vocabulary


def _runs(mask):
  """Lengths of the maximal runs of equal values, with their value: [(value, length), ...]."""
  return [(bool(v), len(list(g))) for v, g in itertools.groupby(mask)]


def _chi2_critical(df, z=3.0902):
  """Upper 0.1% point of chi-square with `df` degrees of freedom (Wilson-Hilferty), so a correct sampler fails
  one run in a thousand; the seeds are fixed, so a run that passes always passes."""
  return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _assert_uniform(counts, what):
  counts = np.asarray(counts, np.float64)
  expected = counts.sum() / len(counts)
  stat = float(((counts - expected) ** 2 / expected).sum())
  assert stat < _chi2_critical(len(counts) - 1), f"{what}: chi2 {stat:.1f} over {len(counts)} cells"


# --------------------------------------------------------------------------------------------- noise mask

@pytest.mark.parametrize("density", [0.05, 0.15, 0.3, 0.5])
@pytest.mark.parametrize("mean", [1.0, 2.0, 3.0, 8.0, 64.0])
def test_noise_mask_counts_and_shape(density, mean):
  for length in list(range(2, 40)) + [63, 100, 257, 568]:
    n = min(max(round(length * density), 1), length - 1)  # Python round: half to even
    k = min(max(round(n / mean), 1), length - n)  # no more spans than non-noise runs can separate
    for seed in range(3):
      mask = data.noise_mask(length, noise_density=density, mean_noise_span_length=mean, seed=seed)
      assert mask.shape == (length,) and mask.dtype == bool
      assert mask.sum() == n, (length, seed)
      runs = _runs(mask)
      assert [v for v, _ in runs] == [False, True] * k, (length, seed)  # starts non-noise, ends noise
      assert np.isclose(np.mean([r for v, r in runs if v]), n / k)  # realised mean span is exactly n/k


def test_noise_mask_rounds_half_to_even():
  count = lambda length, d, m: data.noise_mask(length, noise_density=d, mean_noise_span_length=m, seed=0).sum()
  spans = lambda length, d, m: sum(v for v, _ in _runs(
      data.noise_mask(length, noise_density=d, mean_noise_span_length=m, seed=0)))
  assert count(9, 0.5, 1) == 4 and count(11, 0.5, 1) == 6  # 4.5 -> 4, 5.5 -> 6
  assert count(30, 0.15, 3) == 4 and count(70, 0.15, 3) == 10  # 4.5 -> 4, 10.5 -> 10
  assert spans(10, 0.5, 2) == 2 and spans(14, 0.5, 2) == 4  # 5/2 -> 2, 7/2 -> 4
  assert count(3, 0.01, 3) == 1 and count(3, 0.99, 64) == 2  # clipped to [1, L-1]
  assert spans(32, 0.25, 2) == 4 and count(32, 0.25, 2) == 8  # T5's fixture: 4 spans, 8 tokens


def test_noise_mask_edge_cases_and_determinism():
  kw = dict(noise_density=0.15, mean_noise_span_length=3.0)
  assert data.noise_mask(0, seed=0, **kw).shape == (0,)
  assert data.noise_mask(1, seed=0, **kw).tolist() == [False]
  assert not data.noise_mask(50, noise_density=0.0, mean_noise_span_length=3.0, seed=0).any()
  a = data.noise_mask(500, seed=7, **kw)
  np.testing.assert_array_equal(a, data.noise_mask(500, seed=7, **kw))
  np.testing.assert_array_equal(a, data.noise_mask(500, seed=(7,), **kw))
  assert len({data.noise_mask(500, seed=s, **kw).tobytes() for s in range(20)}) == 20
  with pytest.raises(ValueError):
    data.noise_mask(10, noise_density=0.1, mean_noise_span_length=0.5, seed=0)
  with pytest.raises(ValueError):
    data.noise_mask(10, noise_density=1.5, mean_noise_span_length=3, seed=0)


def test_noise_mask_compositions_are_uniform():
  # L=20, r=0.3, mean 2: n=6 noise tokens in k=3 spans (C(5,2)=10 compositions) and 14 non-noise tokens in 3
  # runs (C(13,2)=78 compositions); each must be equally likely, and the two independent.
  noise_counts, nonnoise_counts, joint = {}, {}, {}
  for seed in range(6000):
    runs = _runs(data.noise_mask(20, noise_density=0.3, mean_noise_span_length=2.0, seed=seed))
    noise = tuple(r for v, r in runs if v)
    nonnoise = tuple(r for v, r in runs if not v)
    noise_counts[noise] = noise_counts.get(noise, 0) + 1
    nonnoise_counts[nonnoise] = nonnoise_counts.get(nonnoise, 0) + 1
    key = (noise, nonnoise[0])
    joint[key] = joint.get(key, 0) + 1
  assert set(noise_counts) == {c for c in itertools.product(range(1, 5), repeat=3) if sum(c) == 6}
  assert len(nonnoise_counts) == math.comb(13, 2)
  _assert_uniform(list(noise_counts.values()), "noise compositions")
  _assert_uniform(list(nonnoise_counts.values()), "non-noise compositions")
  # Independence: given the noise composition, the first non-noise run keeps its marginal law
  # P(first = j) = C(14-j-1, 1) / C(13, 2).
  for noise in noise_counts:
    observed = np.array([joint.get((noise, j), 0) for j in range(1, 13)], np.float64)
    expected = np.array([(13 - j) / math.comb(13, 2) for j in range(1, 13)]) * observed.sum()
    stat = float(((observed - expected) ** 2 / expected).sum())
    assert stat < _chi2_critical(11), (noise, stat)


# ------------------------------------------------------------------------------------------ span corruption

def _split_at_sentinels(ids, is_sentinel):
  """[a a S b S c] -> ([a a], [b], [c]) and the sentinels in order."""
  parts, sentinels, current = [], [], []
  for t in ids:
    if is_sentinel(t):
      parts.append(current)
      sentinels.append(t)
      current = []
    else:
      current.append(t)
  parts.append(current)
  return parts, sentinels


def _check_span_corruption(tokens, inputs, targets, *, first=FIRST_SENTINEL, eos=1, density, mean):
  is_sentinel = lambda t: first - 200 < t <= first
  assert inputs.dtype == np.int32 and targets.dtype == np.int32
  assert inputs[-1] == eos and targets[-1] == eos
  in_parts, in_sentinels = _split_at_sentinels(inputs[:-1], is_sentinel)
  tgt_parts, tgt_sentinels = _split_at_sentinels(targets[:-1], is_sentinel)
  k = len(in_sentinels)
  assert in_sentinels == tgt_sentinels == [first - i for i in range(k)]  # counting down from <extra_id_0>
  if len(tokens) >= 2 and density > 0:
    assert in_parts[-1] == [] and tgt_parts[0] == []  # inputs end with a sentinel, targets start with one
    n = min(max(round(len(tokens) * density), 1), len(tokens) - 1)
    assert (len(inputs), len(targets)) == (len(tokens) - n + k + 1, n + k + 1)
    assert (len(inputs), len(targets)) == data.corrupted_lengths(len(tokens), noise_density=density,
                                                                 mean_noise_span_length=mean)
  # Interleaving the non-noise runs of the inputs with the noise runs of the targets gives the tokens back.
  rebuilt = in_parts[0]
  for i in range(k):
    rebuilt = rebuilt + tgt_parts[i + 1] + in_parts[i + 1]
  assert rebuilt == list(tokens)


@pytest.mark.parametrize("density,mean", [(0.15, 3.0), (0.15, 8.0), (0.5, 3.0), (0.5, 64.0), (0.3, 1.0)])
def test_span_corruption_round_trip(density, mean):
  rng = np.random.default_rng(0)
  for length in [1, 2, 3, 5, 17, 100, 568]:
    tokens = rng.integers(2, 31000, length)  # below the sentinels
    for seed in range(3):
      inputs, targets = data.span_corruption(tokens, first_sentinel_id=FIRST_SENTINEL, noise_density=density,
                                             mean_noise_span_length=mean, seed=seed, num_sentinels=200)
      _check_span_corruption(tokens, inputs, targets, density=density, mean=mean)


def test_span_corruption_small_fixture_and_defaults():
  tokens = np.arange(10, 30)
  inputs, targets = data.span_corruption(tokens, first_sentinel_id=999, seed=3, eos_id=5)
  # 20 tokens at 15%: 3 noise tokens, round(3/3) = 1 span, which ends the sequence.
  assert inputs.tolist() == list(range(10, 27)) + [999, 5]
  assert targets.tolist() == [999, 27, 28, 29, 5]
  empty_in, empty_tgt = data.span_corruption([], first_sentinel_id=999, seed=0)
  assert empty_in.tolist() == [1] and empty_tgt.tolist() == [1]


def test_span_corruption_is_deterministic_by_seed():
  tokens = np.arange(2, 600)
  a = data.span_corruption(tokens, first_sentinel_id=FIRST_SENTINEL, seed=11)
  b = data.span_corruption(tokens, first_sentinel_id=FIRST_SENTINEL, seed=11)
  c = data.span_corruption(tokens, first_sentinel_id=FIRST_SENTINEL, seed=12)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not np.array_equal(a[1], c[1])


def test_span_corruption_refuses_to_run_out_of_sentinels():
  tokens = np.arange(2, 102)  # r=0.5, mean 1: 50 spans
  with pytest.raises(ValueError, match="sentinels"):
    data.span_corruption(tokens, first_sentinel_id=FIRST_SENTINEL, noise_density=0.5, mean_noise_span_length=1.0,
                         seed=0, num_sentinels=49)
  inputs, _ = data.span_corruption(tokens, first_sentinel_id=FIRST_SENTINEL, noise_density=0.5,
                                   mean_noise_span_length=1.0, seed=0, num_sentinels=50)
  assert (inputs[:-1] >= FIRST_SENTINEL - 49).sum() == 50 and inputs[:-1].min() >= 2
  # UL2's X(mean 3, r .5) at 512 inputs: 766 raw tokens hold 128 spans, more than T5's 100 extra ids.
  with pytest.raises(ValueError):
    data.span_corruption(np.arange(2, 768), first_sentinel_id=FIRST_SENTINEL, noise_density=0.5,
                         mean_noise_span_length=3.0, seed=0)


def test_span_corruption_refuses_non_integer_tokens():
  with pytest.raises(ValueError, match="integer ids, got dtype float32"):
    data.span_corruption(np.arange(2, 30, dtype=np.float32), first_sentinel_id=FIRST_SENTINEL, seed=0)


# --------------------------------------------------------------------------------------------- the lengths

@pytest.mark.parametrize("inputs_length,density,mean,expected", [
    (512, 0.15, 3.0, (568, 114)), (568, 0.15, 3.0, (630, 126)), (1024, 0.15, 3.0, (1137, 229)),
    (2048, 0.15, 3.0, (2274, 456)), (64, 0.2, 2.0, (70, 22)), (64, 0.2, 1.0, (63, 27)),
    (512, 0.5, 3.0, (766, 512)),  # the density-0.5 rule: one token less so targets do not exceed inputs
])
def test_span_corruption_lengths_golden(inputs_length, density, mean, expected):
  assert data.span_corruption_lengths(inputs_length, noise_density=density,
                                      mean_noise_span_length=mean) == expected


def test_span_corruption_lengths_are_what_the_corruption_gives():
  # ul2.md §1.4: 568 raw tokens -> exactly 512 inputs and 114 targets, EOS included in both.
  raw, targets_length = data.span_corruption_lengths(512)
  for seed in range(5):
    inputs, targets = data.span_corruption(np.arange(2, 2 + raw), first_sentinel_id=FIRST_SENTINEL, seed=seed)
    assert (len(inputs), len(targets)) == (512, targets_length) == (512, 114)
    assert inputs[-1] == 1 and targets[-1] == 1
  for inputs_length in [3, 10, 33, 100, 300]:
    for density, mean in [(0.15, 3.0), (0.15, 64.0), (0.3, 2.0), (0.5, 8.0)]:
      raw, tl = data.span_corruption_lengths(inputs_length, noise_density=density, mean_noise_span_length=mean)
      got = data.corrupted_lengths(raw, noise_density=density, mean_noise_span_length=mean)
      assert got[0] <= inputs_length and got[1] == tl
      if density != 0.5:  # the longest piece that fits
        assert data.corrupted_lengths(raw + 1, noise_density=density, mean_noise_span_length=mean)[0] > inputs_length


def test_corrupted_lengths_grow_with_the_piece():
  # Mixture budgets are found by bisection over the piece length, which needs this monotonicity.
  for density, mean in [(0.15, 3.0), (0.5, 1.0), (0.5, 64.0), (0.3, 2.0), (0.0, 3.0)]:
    lengths = np.array([data.corrupted_lengths(t, noise_density=density, mean_noise_span_length=mean)
                        for t in range(0, 700)])
    assert (np.diff(lengths, axis=0) >= 0).all(), (density, mean)


# ----------------------------------------------------------------------------------------------------- UL2

R, X, S = (31000,), (31001,), (31002,)  # mode tokens, outside the documents' ids and the sentinels


def _mixture(**kw):
  kw.setdefault("num_sentinels", 200)
  return data.Mixture(data.ul2_denoisers(R, X, S), first_sentinel_id=FIRST_SENTINEL, **kw)


def _check_ul2_example(ex, mixture, piece):
  d = mixture.denoisers[ex.task]
  mode = list(d.mode_ids)
  assert ex.inputs[:len(mode)].tolist() == mode
  assert mode == list({"R": R, "X": X, "S": S}[d.name[0]])
  assert mixture.fits(len(ex.inputs), len(ex.targets))
  body = ex.inputs[len(mode):]
  if d.is_prefix_lm:
    assert body[-1] == 1 and ex.targets[-1] == 1
    assert body[:-1].tolist() + ex.targets[:-1].tolist() == piece.tolist()
    assert (len(piece) < 2 or (1 <= len(body) - 1 <= len(piece) - 1))
  else:
    _check_span_corruption(piece, body, ex.targets, density=d.noise_density, mean=d.mean_noise_span_length)


@pytest.mark.parametrize("budget", [dict(inputs_length=512, targets_length=512),
                                    dict(inputs_length=128, targets_length=64), dict(length=256)])
def test_ul2_examples_fit_and_carry_their_mode_token(budget):
  mixture = _mixture(**budget)
  doc = np.random.default_rng(0).integers(2, 30000, 5000)
  seen = set()
  for seed in range(6):
    examples = data.ul2_examples(doc, mixture, seed=seed)
    offset = 0
    for ex in examples:
      assert ex.num_raw_tokens == min(mixture.raw_lengths[ex.task], len(doc) - offset)
      _check_ul2_example(ex, mixture, doc[offset:offset + ex.num_raw_tokens])
      offset += ex.num_raw_tokens
      seen.add(ex.task)
    assert offset == len(doc)  # the pieces cover the document
  assert seen == set(range(7))


def test_ul2_raw_lengths_fill_the_budget_with_the_mode_tokens_counted():
  # One mode token: R(3, .15) takes 567 tokens, one less than T5's 568, so that inputs stay at 512.
  mixture = _mixture(inputs_length=512, targets_length=512)
  assert mixture.raw_lengths == (567, 587, 765, 907, 599, 1004, 511)
  wide = data.Mixture(data.ul2_denoisers((1, 2, 3), (4, 5, 6), (7, 8, 9)), first_sentinel_id=FIRST_SENTINEL,
                      inputs_length=512, targets_length=512, num_sentinels=200)
  for m in (mixture, wide):
    for d, raw in zip(m.denoisers, m.raw_lengths):
      assert m.fits(*d.lengths(raw)) and not m.fits(*d.lengths(raw + 1)), d.name
  assert all(a > b for a, b in zip(mixture.raw_lengths, wide.raw_lengths))
  decoder_only = _mixture(length=1024)
  for d, raw in zip(decoder_only.denoisers, decoder_only.raw_lengths):
    assert d.total_length(raw) <= 1024 < d.total_length(raw + 1)


def test_ul2_refuses_more_spans_than_sentinels():
  with pytest.raises(ValueError, match="sentinels"):
    _mixture(inputs_length=512, targets_length=512, num_sentinels=100)  # X(3, .5): 127 spans


def test_ul2_task_frequencies_follow_the_rates():
  rates = (1.0, 2.0, 3.0, 4.0, 0.0, 5.0, 6.0)
  mixture = _mixture(inputs_length=64, targets_length=64, rates=rates)
  tokens = np.arange(2, 200)
  n = 4000
  counts = np.bincount([data.ul2_example(tokens, mixture, seed=(5, i)).task for i in range(n)], minlength=7)
  assert counts[4] == 0
  p = np.array(rates) / sum(rates)
  live = p > 0
  stat = float(((counts[live] - n * p[live]) ** 2 / (n * p[live])).sum())
  assert stat < _chi2_critical(int(live.sum()) - 1), (counts, stat)
  # Default: uniform over the seven tasks.
  uniform = _mixture(inputs_length=64, targets_length=64)
  counts = np.bincount([data.ul2_example(tokens, uniform, seed=(6, i)).task for i in range(2100)], minlength=7)
  _assert_uniform(counts, "default rates")


def test_ul2_example_is_deterministic_by_seed():
  mixture = _mixture(inputs_length=128, targets_length=128)
  tokens = np.arange(2, 400)
  a, b = data.ul2_example(tokens, mixture, seed=(1, 2)), data.ul2_example(tokens, mixture, seed=(1, 2))
  assert a.task == b.task and np.array_equal(a.inputs, b.inputs) and np.array_equal(a.targets, b.targets)
  assert len({data.ul2_example(tokens, mixture, seed=(1, i)).inputs.tobytes() for i in range(10)}) == 10


def test_prefix_lm_split_is_uniform():
  tokens = np.arange(2, 12)  # L = 10: prefix length uniform over 1..9
  lengths = [len(data.prefix_lm(tokens, seed=s)[0]) - 1 for s in range(2700)]
  assert set(lengths) == set(range(1, 10))
  _assert_uniform(np.bincount(lengths)[1:], "prefix lengths")
  quarter = [len(data.prefix_lm(tokens, noise_density=0.25, seed=s)[0]) - 1 for s in range(300)]
  assert min(quarter) == round(0.5 * 9) and max(quarter) == 9  # lo = round((1 - 2d)(L - 1))


# ------------------------------------------------------------------------------------------------- packing

def test_pack_encoder_decoder_matches_seqio_fixture():
  # seqio's packed EncDec example: targets [3 8 1] [9 1] [5 4 1] -> decoder inputs [0 3 8 0 9 0 5 4 0 0].
  examples = [([7, 8, 5, 1], [3, 8, 1]), ([8, 4, 9, 3, 1], [9, 1]), ([1], [5, 4, 1])]
  f = data.pack_encoder_decoder(examples, inputs_length=10, targets_length=10)
  assert f["input_ids"].tolist() == [[7, 8, 5, 1, 8, 4, 9, 3, 1, 1]]
  assert f["encoder_segment_ids"].tolist() == [[1, 1, 1, 1, 2, 2, 2, 2, 2, 3]]
  assert f["encoder_positions"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 4, 0]]
  assert f["decoder_target_ids"].tolist() == [[3, 8, 1, 9, 1, 5, 4, 1, 0, 0]]
  assert f["decoder_input_ids"].tolist() == [[0, 3, 8, 0, 9, 0, 5, 4, 0, 0]]
  assert f["decoder_segment_ids"].tolist() == [[1, 1, 1, 2, 2, 3, 3, 3, 0, 0]]
  assert f["decoder_positions"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 0, 0]]
  assert f["decoder_loss_weights"].tolist() == [[1, 1, 1, 1, 1, 1, 1, 1, 0, 0]]
  assert f["decoder_loss_weights"].dtype == np.float32


def _unpack(tokens_BL, segment_ids_BL):
  """Packed rows -> the list of segments, row by row, in order."""
  out = []
  for tokens, seg in zip(tokens_BL, segment_ids_BL):
    for s in range(1, seg.max() + 1):
      out.append(tokens[seg == s].tolist())
  return out


@pytest.mark.parametrize("num_bins", [1, 3])
def test_packing_keeps_examples_whole_and_numbers_segments(num_bins):
  rng = np.random.default_rng(0)
  examples = [(rng.integers(2, 100, rng.integers(1, 13)).tolist(), rng.integers(2, 100, rng.integers(1, 7)).tolist())
              for _ in range(60)]
  f = data.pack_encoder_decoder(examples, inputs_length=12, targets_length=6, num_bins=num_bins)
  for side, L in (("encoder", 12), ("decoder", 6)):
    seg, pos = f[f"{side}_segment_ids"], f[f"{side}_positions"]
    assert seg.shape[1] == L
    for s_row, p_row in zip(seg, pos):
      real = s_row > 0
      assert real[:real.sum()].all()  # padding only at the end
      assert np.all(np.diff(s_row[real]) >= 0) and set(s_row[real]) == set(range(1, s_row.max() + 1))
      for s in range(1, s_row.max() + 1):
        assert p_row[s_row == s].tolist() == list(range((s_row == s).sum()))
      assert not p_row[~real].any()
  ins = _unpack(f["input_ids"], f["encoder_segment_ids"])
  tgts = _unpack(f["decoder_target_ids"], f["decoder_segment_ids"])
  pairs = list(zip(ins, tgts))
  if num_bins == 1:  # stream order, and a row closes exactly when the next example does not fit
    assert pairs == [tuple(e) for e in examples]
    row_of = np.repeat(np.arange(len(f["input_ids"])), f["encoder_segment_ids"].max(axis=1))
    for i in range(1, len(examples)):
      if row_of[i] != row_of[i - 1]:
        used_in = sum(len(examples[j][0]) for j in range(i) if row_of[j] == row_of[i - 1])
        used_tgt = sum(len(examples[j][1]) for j in range(i) if row_of[j] == row_of[i - 1])
        assert used_in + len(examples[i][0]) > 12 or used_tgt + len(examples[i][1]) > 6
  else:
    assert sorted(pairs) == sorted(tuple(e) for e in examples)
  # Decoder inputs: each segment's targets shifted right behind a 0.
  for dec_in, tgt in zip(_unpack(f["decoder_input_ids"], f["decoder_segment_ids"]), tgts):
    assert dec_in == [0] + tgt[:-1]


def test_pack_without_packing_puts_one_example_per_row():
  examples = [([5, 6, 1], [7, 1]), ([8, 1], [9, 9, 1])]
  f = data.pack_encoder_decoder(examples, inputs_length=4, targets_length=4, pack=False)
  assert f["input_ids"].tolist() == [[5, 6, 1, 0], [8, 1, 0, 0]]
  assert f["decoder_input_ids"].tolist() == [[0, 7, 0, 0], [0, 9, 9, 0]]
  with pytest.raises(ValueError):
    data.pack_encoder_decoder([([1] * 5, [1])], inputs_length=4, targets_length=4)


def test_pack_decoder_only_prefix_lm_layout():
  # inputs [5 6 1] targets [7 1]; then an LM example (no inputs) [8 9 1]; start token 2 (a Gemma-style BOS).
  f = data.pack_decoder_only([([5, 6, 1], [7, 1]), ([], [8, 9, 1])], length=10, start_id=2)
  assert f["target_ids"].tolist() == [[5, 6, 1, 7, 1, 8, 9, 1, 0, 0]]
  assert f["input_ids"].tolist() == [[2, 5, 6, 1, 7, 2, 8, 9, 0, 0]]
  assert f["segment_ids"].tolist() == [[1, 1, 1, 1, 1, 2, 2, 2, 0, 0]]
  assert f["positions"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 0]]
  assert f["loss_weights"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 1, 0, 0]]
  # seqio's decoder_causal_attention: position < |inputs| + 1 within each segment.
  assert f["prefix_mask"].tolist() == [[1, 1, 1, 1, 0, 1, 0, 0, 0, 0]]
