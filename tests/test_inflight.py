"""In-flight batching (t5x_lite/inflight.py, decoding/slots.py) against static batching, for every family: requests
of mixed prompt and output lengths, ending by EOS or by their own max_new_tokens, give the same greedy tokens as
`Model.generate` whatever their neighbours and slot counts, sharded too; sampling draws depend on the request's seed
and stream only; images enter with their request; per-row sampling filters equal decoding/sampling's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_family_conformance import TINY, _built
import transformers as tf
from conftest import build_hf
from test_t5gemma2_parity import tiny_config
from test_t5gemma2_vision import BOI, EOI, IMAGE, TOKENS

import t5x_lite
from t5x_lite import inflight, sharding
from t5x_lite.decoding import slots as slots_lib
from t5x_lite.decoding.sampling import filter_logits
from t5x_lite.model import Model
from t5x_lite.models.params import axes_tree
from t5x_lite.models.registry import family_of_config

# Every registered family with a language-model head in the conformance checklist's tiny configs.
FAMILIES = tuple(name for name, tasks in TINY.items() if "lm" in tasks)


def _requests(config, n: int, rng_seed: int, **settings) -> list[inflight.Request]:
  rng = np.random.default_rng(rng_seed)
  top = min(config.vocab_size, 120)
  return [inflight.Request(rng.integers(2, top, rng.integers(1, 20)).tolist(), int(rng.integers(1, 24)), **settings)
          for _ in range(n)]


def _static(model, requests) -> list[np.ndarray]:
  """`Model.generate`'s tokens for the requests as one static batch (bucketed shapes, left or right padding), each
  row cut at its own limit and after its EOS, as in-flight answers are."""
  config = model.config
  width = max(len(r.ids) for r in requests)
  ids = np.full((len(requests), width), config.pad_token_id, np.int32)
  mask = np.zeros_like(ids)
  for i, r in enumerate(requests):
    cols = slice(0, len(r.ids)) if config.is_encoder_decoder else slice(width - len(r.ids), width)
    ids[i, cols], mask[i, cols] = r.ids, 1
  pixels = [r.pixel_values() if callable(r.pixel_values) else r.pixel_values for r in requests]
  pixels = [p for p in pixels if p is not None]
  rows = model.generate(ids, mask, np.concatenate(pixels) if pixels else None,
                        max_new_tokens=max(r.max_new_tokens for r in requests))
  out = []
  for r, row in zip(requests, rows):
    row = row[:r.max_new_tokens]
    eos = np.flatnonzero(row == config.eos_token_id)
    out.append(row[:eos[0] + 1] if eos.size else row)
  return out


@pytest.fixture(scope="module", params=FAMILIES)
def case(request):
  """The family's tiny random model, its EOS moved to a token its greedy outputs often emit (so that requests end
  by EOS at different steps as well as by their limits), 14 requests and their static answers."""
  config, _, params = _built(request.param, "lm")
  ids = np.random.default_rng(9).integers(2, min(config.vocab_size, 120), (8, 12))
  outputs = Model(config, params).generate(ids, max_new_tokens=16)[:, 1:]
  counts = np.bincount(outputs.ravel(), minlength=config.vocab_size)
  model = Model(config.replace(eos_token_id=int(np.argmax(counts))), params)
  requests = _requests(model.config, 14, 1)
  return model, requests, _static(model, requests)


def _inflight(model, requests, **kw) -> dict[int, np.ndarray]:
  answers = dict(inflight.generate(model, requests, **kw))
  assert sorted(answers) == list(range(len(requests)))
  return answers


def test_greedy_equals_static_batching_whatever_the_neighbours(case):
  model, requests, want = case
  eos = model.config.eos_token_id
  assert any(w[-1] == eos for w in want)  # some end by EOS, some by their limits
  assert any(len(w) == r.max_new_tokens and w[-1] != eos for w, r in zip(want, requests))
  for slots, refill in ((3, 1), (16, 4)):
    got = _inflight(model, requests, slots=slots, refill=refill)
    for i, w in enumerate(want):
      np.testing.assert_array_equal(got[i], w, err_msg=f"request {i}, slots={slots}, refill={refill}")


def test_attention_spans_follow_the_longest_busy_request(case, monkeypatch):
  """Requests of up to 100 new tokens: runs read the last 32, 64, 128... clock values as the busy requests' keys
  grow (decoding/slots.py), over rings the shared clock wraps several times, and answers stay static batching's."""
  model, _, _ = case
  config = model.config
  ids = np.random.default_rng(9).integers(2, min(config.vocab_size, 120), (8, 12))
  counts = np.bincount(model.generate(ids, max_new_tokens=16).ravel(), minlength=config.vocab_size)
  model = Model(config.replace(eos_token_id=int(np.argmin(counts))), model.params)  # requests end at their limits
  rng = np.random.default_rng(4)
  requests = [inflight.Request(rng.integers(2, min(config.vocab_size, 120), n).tolist(), limit)
              for n, limit in ((5, 3), (17, 100), (1, 40), (9, 75), (19, 9), (3, 60), (12, 30), (7, 90))]
  want = _static(model, requests)
  spans = []
  programs = inflight.programs

  def recording(*args, **kwargs):
    made = programs(*args, **kwargs)

    def run(weights, state, want_free, span):
      spans.append(span)
      return made.run(weights, state, want_free, span=span)

    return made._replace(run=run)

  monkeypatch.setattr(inflight, "programs", recording)
  got = _inflight(model, requests, slots=3, refill=1)
  for i, w in enumerate(want):
    np.testing.assert_array_equal(got[i], w, err_msg=f"request {i}")
  assert {32, 64}.issubset(spans) and max(spans) >= 128, spans


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (XLA_FLAGS host device count)")
def test_sharded_equals_unsharded(case):
  """Slots split over data x fsdp, weights over fsdp and tensor."""
  model, requests, want = case
  mesh = t5x_lite.make_mesh("data:2,fsdp:2,tensor:2")
  specs = family_of_config(model.config).param_specs(model.config)
  sharded = Model(model.config, jax.device_put(model.params, sharding.tree_shardings(mesh, axes_tree(specs), specs)),
                  mesh=mesh)
  got = _inflight(sharded, requests, slots=4)
  for i, w in enumerate(want):
    np.testing.assert_array_equal(got[i], w, err_msg=f"request {i}")


def test_sampling_draws_depend_on_the_request_only(case):
  model, requests, want = case
  base = _requests(model.config, 8, 3, method="sample", temperature=2.0, top_k=20, top_p=0.9, seed=7)
  base = [r._replace(stream=i) for i, r in enumerate(base)]
  first = _inflight(model, [requests[0], *base], slots=3)
  np.testing.assert_array_equal(first[0], want[0])  # a greedy neighbour of sampling ones
  # Other neighbours and slots, in another order (the same compiled programs: only the requests move).
  reverse = _inflight(model, [requests[0], *base[::-1]], slots=3, refill=2)
  for i in range(len(base)):
    np.testing.assert_array_equal(reverse[len(base) - i], first[1 + i])
  # Another seed draws otherwise.
  other = _inflight(model, [requests[0], *(r._replace(seed=8) for r in base)], slots=3)
  assert any(not np.array_equal(other[1 + i], first[1 + i]) for i in range(len(base)))


def test_per_row_filters_equal_the_static_filters():
  logits = jax.random.normal(jax.random.key(0), (6, 50)) * 3
  settings = [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (2.0, 3, 0.5), (1.0, 50, 1.0), (0.5, 1, 0.95)]
  got = slots_lib._filtered(logits, jnp.array([s[0] for s in settings]), jnp.array([s[1] for s in settings]),
                            jnp.array([s[2] for s in settings]), True)
  for r, (temperature, top_k, top_p) in enumerate(settings):
    want = filter_logits(logits[r:r + 1], temperature=temperature, top_k=top_k, top_p=top_p)[0]
    np.testing.assert_array_equal(np.isinf(got[r]), np.isinf(want))
    np.testing.assert_allclose(np.where(np.isinf(want), 0, got[r]), np.where(np.isinf(want), 0, want), rtol=1e-6)


def test_requests_with_images_equal_static_generation(tmp_path):
  """test_t5gemma2_vision's tiny model: 32 px images, 16 tokens each."""
  build_hf(tf.T5Gemma2ForConditionalGeneration, tiny_config(), tmp_path)
  model = t5x_lite.load(str(tmp_path), progress=False)
  rng = np.random.default_rng(5)

  def prompt(parts):
    ids = []
    for part in parts:
      ids += [BOI] + [IMAGE] * TOKENS + [EOI] if part == "image" else rng.integers(3, 250, part).tolist()
    return ids

  layouts = [[3, "image", 2], [4], [2, "image", 3, "image"], [6, "image"], [5]]
  requests = []
  for i, parts in enumerate(layouts):
    n = parts.count("image")
    pixels = rng.uniform(-1, 1, (n, 3, 32, 32)).astype(np.float32) if n else None
    loader = (lambda p=pixels: p) if i % 2 and pixels is not None else pixels  # loaded on admission, or given
    requests.append(inflight.Request(prompt(parts), 4 + 3 * i, pixel_values=loader))
  got = _inflight(model, requests, slots=2, refill=1)
  for i, w in enumerate(_static(model, requests)):
    np.testing.assert_array_equal(got[i], w, err_msg=f"request {i}")
  # An image count that does not match its tokens is that request's error, not the run's.
  bad = requests[0]._replace(pixel_values=np.zeros((2, 3, 32, 32), np.float32))
  answers = dict(inflight.generate(model, [requests[1], bad], slots=2))
  assert isinstance(answers[1], ValueError) and "ask for 1 images" in str(answers[1])
  np.testing.assert_array_equal(answers[0], got[1])


@pytest.mark.parametrize("request_, message", [
    (inflight.Request([], 3), "non-empty"),
    (inflight.Request([5, 999], 3), "outside the vocabulary"),
    (inflight.Request([5], 0), "max_new_tokens"),
    (inflight.Request([5], 3, method="beam"), "static batches"),
    (inflight.Request([5], 3, method="sample", temperature=0.0), "temperature"),
    (inflight.Request([5], 3, pixel_values=np.zeros((1, 3, 8, 8))), "no vision encoder"),
])
def test_bad_requests_named(request_, message):
  config, _, params = _built("gemma", "lm")
  with pytest.raises(ValueError, match=message) as e:
    list(inflight.generate(Model(config, params), [inflight.Request([3], 2), request_]))
  assert "request 1" in str(e.value)
