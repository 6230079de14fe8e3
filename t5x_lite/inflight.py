"""In-flight batching on the host side: feed requests into a model's decoding slots and hand back each answer as it
ends (decoding/slots.py holds the compiled programs).

Waiting requests are encoded (or prefilled) `slots` at a time, in input order, and wait on the device until slots
free up; an admission then only copies their keys into the free rows. Encoding them as slots free up instead made
many small encoder calls: t5-v1_1-small, 64-token inputs, 13.3 ms per request at 2 rows against 9.6 ms at 8.

Stagings and admissions are bucketed (requests and prompt length to powers of two) and the slots' sizes are fixed
by the longest prompt and the largest `max_new_tokens` of the request list, so a request list compiles one run per
attention span, one init and a few staging and admission programs however varied its requests.

After each admission the slots decode until `refill` of them are free (or all, once no request waits): a smaller
`refill` keeps the slots fuller, a larger one returns to the host less often.
"""

from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import jax
import numpy as np

from t5x_lite.decoding import buckets
from t5x_lite.decoding.slots import Admission, programs, span_for
from t5x_lite.model import Model
from t5x_lite.models.registry import family_of_config


class Request(NamedTuple):
  """One generation request. `ids`: its prompt (or encoder input) tokens; `pixel_values`: its images (I, c, h, w) in
  the processor's layout, for a model with a vision tower, or a function that loads them (called when the request
  is staged with up to `slots` requests after it, ahead of its slot, so a long list of image requests holds at most
  `slots` requests' images at a time). Sampling draws with fold_in(key(seed), stream), so two requests with the
  same seed and stream draw alike wherever they run."""
  ids: Sequence[int]
  max_new_tokens: int
  method: str = "greedy"
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  stream: int = 0
  pixel_values: np.ndarray | Callable[[], np.ndarray] | None = None


def check_request(model, request: Request, where: str) -> None:
  """ValueError naming `where` for a request the model cannot run (its images are checked when they load)."""
  ids = np.asarray(request.ids)
  if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"{where}: ids must be a non-empty list of token ids")
  if ids.min() < 0 or ids.max() >= model.config.vocab_size:
    raise ValueError(f"{where}: holds id {ids[(ids < 0) | (ids >= model.config.vocab_size)][0]}, outside the "
                     f"vocabulary [0, {model.config.vocab_size})")
  if request.method not in ("greedy", "sample"):
    raise ValueError(f"{where}: method must be 'greedy' or 'sample' with in-flight batching (beam search runs in "
                     f"static batches), got {request.method!r}")
  check = Model._check_generation_args  # pylint: disable=protected-access  (the ranges Model.generate takes)
  try:
    check(request.max_new_tokens, request.method, request.temperature, request.top_k, request.top_p, 1, 1.0, "hf",
          request.seed)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None
  if request.pixel_values is not None and family_of_config(model.config).image_rows is None:
    raise ValueError(f"{where}: images given, but {model.config.family} has no vision encoder")


def _image_row(model, request: Request) -> np.ndarray | None:
  """The request's images laid out as one row (1, I, c, h, w) by its family (ValueError when its image tokens and
  images disagree or they fail to load), or None."""
  if request.pixel_values is None:
    return None
  pixels = request.pixel_values() if callable(request.pixel_values) else request.pixel_values
  return family_of_config(model.config).image_rows(model.config, np.asarray(request.ids, np.int32)[None], pixels)


def generate(model, requests: Sequence[Request], *, slots: int = 8, refill: int | None = None
             ) -> Iterator[tuple[int, np.ndarray | ValueError]]:
  """Yields (index into `requests`, its new tokens: int32, EOS kept, nothing after it) as each request ends; for a
  request whose images fail to load or do not match its image tokens, (index, the ValueError) when it is staged.

  `slots` requests decode at once; `refill` (default slots // 4, at least 1): how many must be free before the
  next admission. Greedy tokens equal `model.generate`'s for the same request, whatever its neighbours. Every
  request is checked before anything runs (ValueError naming the first bad one).
  """
  if not isinstance(slots, int) or slots < 1:
    raise ValueError(f"slots must be a positive integer, got {slots!r}")
  refill = max(1, slots // 4) if refill is None else refill
  if not isinstance(refill, int) or not 1 <= refill <= slots:
    raise ValueError(f"refill must be an integer in [1, slots={slots}], got {refill!r}")
  for i, r in enumerate(requests):
    check_request(model, r, f"request {i}")
  if not requests:
    return
  config = model.config
  input_length = buckets.bucket(max(len(r.ids) for r in requests))
  width = buckets.bucket(max(r.max_new_tokens for r in requests))
  cache_length = width if config.is_encoder_decoder else input_length + width
  sampling = any(r.method == "sample" for r in requests)
  filters = any(r.method == "sample" and (r.top_k > 0 or r.top_p < 1.0) for r in requests)
  prepare, init, stage, admit, run, spans = programs(config, slots=slots, input_length=input_length,
                                                     cache_length=cache_length, width=width, sampling=sampling,
                                                     filters=filters)
  keys = _request_keys(requests)

  with model._mesh_context():  # pylint: disable=protected-access
    weights = prepare(model.params)
    state = init(weights)
    pending = list(range(len(requests)))[::-1]  # popped from the end: input order
    staged, waiting = None, []  # the last staged group, and (its index there, request index) not yet admitted
    in_slot = [-1] * slots
    while pending or waiting or any(i >= 0 for i in in_slot):
      free = [r for r in range(slots) if in_slot[r] < 0]
      while free and (waiting or pending):
        if not waiting:  # the next `slots` requests, encoded in one call
          group, images = [], {}
          while pending and len(group) < slots:
            i = pending.pop()
            try:
              images[i] = _image_row(model, requests[i])
            except ValueError as e:
              yield i, e
              continue
            group.append(i)
          if not group:
            break
          staged = stage(weights, *_stage_inputs(model, requests, images, group))
          waiting = list(enumerate(group))
        chosen, waiting = waiting[:len(free)], waiting[len(free):]
        rows, free = free[:len(chosen)], free[len(chosen):]
        state = admit(state, staged, _admission(model, requests, keys, chosen, rows))
        for r, (_, i) in zip(rows, chosen):
          in_slot[r] = i
      busy = sum(i >= 0 for i in in_slot)
      if not busy:
        continue
      left = len(pending) + len(waiting)
      want_free = slots - busy + min(left, refill) if left else slots
      # The shortest attention span that holds every busy slot's keys at the next step (the run stops before
      # they outgrow it, and the loop comes back here for a longer one).
      clock, since = _on_host(state.clock), _on_host(state.since)
      keys_needed = max(int(clock - since[r]) + 1 for r in range(slots) if in_slot[r] >= 0)
      state = run(weights, state, np.int32(want_free), span=span_for(keys_needed, spans))
      done, count, out = (_on_host(x) for x in (state.done, state.count, state.out))
      for r in range(slots):
        if in_slot[r] >= 0 and done[r]:
          yield in_slot[r], out[r, :count[r]].astype(np.int32)
          in_slot[r] = -1


def _on_host(x: jax.Array) -> np.ndarray:
  """A replicated array as numpy: this process's copy (with several processes the array spans devices this one
  cannot read, yet each holds all of it)."""
  return np.asarray(x if x.is_fully_addressable else x.addressable_data(0))


def _request_keys(requests: Sequence[Request]) -> np.ndarray:
  """(requests, 2) uint32: each sampling request's key data, fold_in(key(seed), stream); zeros for greedy ones."""
  out = np.zeros((len(requests), 2), np.uint32)
  for i, r in enumerate(requests):
    if r.method == "sample":
      out[i] = jax.random.key_data(jax.random.fold_in(jax.random.key(r.seed), r.stream))
  return out


def _stage_inputs(model, requests, images: dict, group: list[int]) -> tuple:
  """(ids, mask, extra) of requests `group` for `stage`, padded to bucket shapes (padding rows are never admitted;
  images to the most any of them has)."""
  config = model.config
  Q = buckets.bucket(len(group), floor=1)
  P = buckets.bucket(max(len(requests[i].ids) for i in group))
  ids = np.full((Q, P), config.pad_token_id, np.int32)
  mask = np.zeros((Q, P), np.int32)
  loaded = [x for x in images.values() if x is not None]
  pixels = None
  if loaded:
    pixels = np.zeros((Q, buckets.bucket(max(x.shape[1] for x in loaded), floor=1), *loaded[0].shape[2:]),
                      np.float32)
  for q, i in enumerate(group):
    n = len(requests[i].ids)
    cols = slice(0, n) if config.is_encoder_decoder else slice(P - n, P)
    ids[q, cols], mask[q, cols] = requests[i].ids, 1
    if images.get(i) is not None:
      pixels[q, :images[i].shape[1]] = images[i][0]
  place = model._place  # pylint: disable=protected-access
  return place(ids), place(mask), ({} if pixels is None else {"pixel_values_BI3HW": place(pixels)})


def _admission(model, requests, keys, chosen: list[tuple[int, int]], rows: list[int]) -> Admission:
  """The admission of staged requests `chosen` ((index among the staged, request index) pairs) into slot rows
  `rows`, padded to a bucket (padding rows point past the last slot, so the programs drop them)."""
  A = buckets.bucket(len(chosen), floor=1)
  row_ids = np.full((A,), np.iinfo(np.int32).max, np.int32)
  picks = np.zeros((A,), np.int32)
  fields = {"limit": np.ones((A,), np.int32), "sample": np.zeros((A,), bool),
            "temperature": np.ones((A,), np.float32), "top_k": np.zeros((A,), np.int32),
            "top_p": np.ones((A,), np.float32)}
  request_keys = np.zeros((A, 2), np.uint32)
  for a, ((q, i), row) in enumerate(zip(chosen, rows)):
    r = requests[i]
    row_ids[a], picks[a] = row, q
    fields["limit"][a], fields["sample"][a] = r.max_new_tokens, r.method == "sample"
    fields["temperature"][a], fields["top_k"][a], fields["top_p"][a] = r.temperature, r.top_k, r.top_p
    request_keys[a] = keys[i]
  place = model._place  # pylint: disable=protected-access
  return Admission(rows=place(row_ids), picks=place(picks), keys=place(request_keys),
                   **{name: place(value) for name, value in fields.items()})
