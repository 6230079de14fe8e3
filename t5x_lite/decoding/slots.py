"""In-flight (continuous) batching: a fixed number of slots, each decoding one request; when a request ends (EOS or
its own limit) the next takes its slot. The model-agnostic programs over a family's `SlotDecoder`.

Jitted programs, whatever the mix of requests (shapes are static; stagings and admissions are bucketed):
  init(weights)                         -> SlotState with every slot idle
  stage(weights, ids, mask, images)     -> Staged: Q waiting requests encoded (or prefilled) together
  admit(state, staged, admission)       -> the state with A of the staged requests written into free slot rows
  run(weights, state, want_free, span)  -> the state after decoding steps, stopped once `want_free` slots are free
                                           or a busy slot's keys would outgrow `span`
The host (t5x_lite/inflight.py) stages requests `slots` at a time and alternates admit and run; nothing inside a
run returns to the host.

Attention spans: the self-attention caches are rings long enough for the longest request, but a step reads only
the keys of the last `span` clock values, `span` the smallest of `spans` (powers of two, then the longest
request's length; one compiled run each) that covers every busy slot's keys: each layer keeps one ring per span,
written at every step, and a run reads the ring of its span (kv_cache.Ring). A request's keys grow one per step,
so the host picks the span before each run and the run stops when it would no longer cover them. Static batching reads
each batch's own cache length; without spans every in-flight step would read the ring sized for the longest
request of the whole list.

Every request decides its own tokens: greedy rows take the argmax; sampling rows draw token t with
`fold_in(request key, t)` after their own temperature / top-k / top-p, so a request's output depends on its seed
alone, never on its slot or its neighbours. Shape letters: t5x_lite/shapes.py (R slots, A requests admitted
together, T the widest output).
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from t5x_lite import sharding
from t5x_lite.decoding import kv_cache
from t5x_lite.decoding.sampling import outside_top_p
from t5x_lite.models.registry import family_of_config
from t5x_lite.nn.argmax import argmax
from t5x_lite.nn.quant import for_decoding


class SlotState(NamedTuple):
  """Everything the slots carry between programs; per-slot fields are (R,)."""
  cache: Any  # the family's (SlotDecoder.init)
  clock: jax.Array  # () int32: the shared step counter that indexes the caches' rings
  since: jax.Array  # the clock value of the slot's first key (its prompt's first real token, or its first step)
  tokens: jax.Array  # the token each slot feeds at its next step
  count: jax.Array  # tokens written to `out` so far
  limit: jax.Array  # the request's max_new_tokens
  done: jax.Array  # bool: finished, or idle
  out: jax.Array  # (R, T) int32: the request's tokens so far, pad after them
  keys: jax.Array  # (R, 2) uint32: each request's sampling key (raw key data)
  sample: jax.Array  # bool: draws (True) or takes the argmax
  temperature: jax.Array  # float32
  top_k: jax.Array  # int32, 0 = no top-k filter
  top_p: jax.Array  # float32, 1.0 = no top-p filter


class Staged(NamedTuple):
  """Requests encoded (or prefilled) ahead of their slots, every leaf (Q, ...): Q requests staged together."""
  state: Any  # the family's (SlotDecoder.encode)
  lengths: jax.Array  # (Q,) int32: each request's real input tokens
  first_logits: jax.Array | None  # (Q, V) float32, decoder-only: the logits of the first new token


class Admission(NamedTuple):
  """A staged requests for free slot rows (rows >= R: batch padding, dropped), each field (A,) unless stated."""
  rows: jax.Array  # int32 slot row of each request
  picks: jax.Array  # int32: its index among the staged requests
  limit: jax.Array  # int32 max_new_tokens
  keys: jax.Array  # (A, 2) uint32
  sample: jax.Array
  temperature: jax.Array
  top_k: jax.Array
  top_p: jax.Array


def _filtered(logits_RV: jax.Array, temperature_R, top_k_R, top_p_R, filters: bool) -> jax.Array:
  """decoding/sampling.filter_logits with per-row settings: temperature, then top-k (keeping ties with the k-th
  largest), then top-p (the token that crosses p kept). `filters=False` compiles temperature alone."""
  logits = logits_RV / temperature_R[:, None]
  if not filters:
    return logits
  V = logits.shape[-1]
  ascending = jnp.sort(logits, axis=-1)
  kth = jnp.take_along_axis(ascending, jnp.clip(V - top_k_R, 0, V - 1)[:, None], axis=-1)
  logits = jnp.where((top_k_R[:, None] > 0) & (logits < kth), -jnp.inf, logits)
  remove = outside_top_p(logits, top_p_R[:, None]) & (top_p_R < 1.0)[:, None]  # p = 1: no filter, as there
  return jnp.where(remove, -jnp.inf, logits)


def _choose(logits, keys_R2, t_R, sample_R, temperature_R, top_k_R, top_p_R, *, sampling: bool, filters: bool,
            vocab_major: bool = False) -> jax.Array:
  """(R,) int32: argmax per row, or for sampling rows one draw with fold_in(request key, t). `logits` (R, V), or
  (V, R) with `vocab_major` (the argmax reads them as they lie; only sampling transposes them)."""
  greedy = argmax(logits, axis=0 if vocab_major else -1)
  if not sampling:
    return greedy
  logits_RV = logits.T if vocab_major else logits
  filtered = _filtered(logits_RV.astype(jnp.float32), temperature_R, top_k_R, top_p_R, filters)
  draw_keys = jax.vmap(lambda k, t: jax.random.fold_in(jax.random.wrap_key_data(k), t))(keys_R2, t_R)
  drawn = jax.vmap(jax.random.categorical)(draw_keys, filtered).astype(jnp.int32)
  return jnp.where(sample_R, drawn, greedy)


# The clock starts here so that every prompt's clock values [clock - P, clock) are non-negative; int32 leaves
# 2**31 - 2**20 steps after it.
_FIRST_CLOCK = 2 ** 20
# The shortest attention span compiled: each span is one more compiled run.
_SHORTEST_SPAN = 32


class SlotPrograms(NamedTuple):
  """What `programs` gives: the jitted programs (the module docstring) and the attention spans `run` takes."""
  prepare: Any
  init: Any
  stage: Any
  admit: Any
  run: Any
  spans: tuple[int, ...]


def attention_spans(cache_length: int) -> tuple[int, ...]:
  """The spans a run may read: powers of two from _SHORTEST_SPAN below `cache_length`, then `cache_length`."""
  spans, span = [], _SHORTEST_SPAN
  while span < cache_length:
    spans.append(span)
    span *= 2
  return (*spans, cache_length)


def span_for(keys: int, spans: tuple[int, ...]) -> int:
  """The shortest span that holds `keys` keys."""
  return next(span for span in spans if span >= keys)


@functools.lru_cache(maxsize=16)
def programs(config, *, slots: int, input_length: int, cache_length: int, width: int, sampling: bool,
             filters: bool) -> SlotPrograms:
  """The jitted (prepare, init, stage, admit, run) and attention spans for `config`'s family over R = `slots`
  requests of up to `input_length` input tokens, T = `width` new tokens each, `cache_length` self-attention positions
  (decoder-only: prompt and new tokens). `sampling`: some request samples (greedy-only runs compile the argmax
  alone); `filters`: some sampling request uses top-k or top-p (each step then sorts the vocabulary)."""
  spans = attention_spans(cache_length)
  ring = kv_cache.Ring(cache_length, spans)
  slot_decoder = family_of_config(config).slot_decoder(config, slots, input_length, ring)
  R, T = slots, width
  eos_id, pad_id = config.eos_token_id, config.pad_token_id
  choose = functools.partial(_choose, sampling=sampling, filters=filters)

  def rows(state: SlotState) -> SlotState:
    """The caches split over the batch mesh axes by slot; the small per-slot fields replicated, so that every
    process reads them whole after a run (no-ops without a mesh; a lone slot's cache has no slot axis)."""
    def split(x):
      if R == 1 or x.ndim == 0 or x.shape[0] != R:
        return x
      return sharding.constrain(x, ("act_batch",) + (None,) * (x.ndim - 1))

    def replicated(x):
      return sharding.constrain(x, (None,) * x.ndim)

    return jax.tree.map(replicated, state._replace(cache=None))._replace(cache=jax.tree.map(split, state.cache))

  def init(weights):  # pylint: disable=unused-argument
    zeros = jnp.zeros((R,), jnp.int32)
    return rows(SlotState(
        cache=slot_decoder.init(), clock=jnp.int32(_FIRST_CLOCK), since=zeros, tokens=zeros, count=zeros,
        limit=zeros, done=jnp.ones((R,), bool), out=jnp.full((R, T), pad_id, jnp.int32),
        keys=jnp.zeros((R, 2), jnp.uint32), sample=jnp.zeros((R,), bool), temperature=jnp.ones((R,), jnp.float32),
        top_k=zeros, top_p=jnp.ones((R,), jnp.float32)))

  def stage(weights, ids, mask, extra) -> Staged:
    """Q requests' ids and mask (Q, P), right-padded (encoder-decoder) or left-padded (decoder-only), and the
    encoder's keyword inputs per request (images), encoded together before any of them has a slot: one encoder
    call over `slots` requests where admissions as slots free up would make several small ones."""
    staged, first_logits = slot_decoder.encode(weights, ids, mask, extra)
    return Staged(staged, jnp.sum(mask, axis=1, dtype=jnp.int32), first_logits)

  def admit(state: SlotState, staged: Staged, a: Admission) -> SlotState:
    # The clock does not move: a decoder-only prompt takes the clock values just before it, in its own row.
    def picked(x):
      return jnp.take(x, a.picks, axis=0)

    cache = slot_decoder.place(state.cache, a.rows, jax.tree.map(picked, staged.state), state.clock)
    first_logits = None if staged.first_logits is None else picked(staged.first_logits)

    def put(field, values):
      return field.at[a.rows].set(values, mode="drop")

    out = jnp.full((a.rows.shape[0], T), pad_id, jnp.int32)
    if first_logits is None:  # encoder-decoder: the first step feeds the start token
      tokens = jnp.full_like(a.limit, slot_decoder.start_token)
      count, done = jnp.zeros_like(a.limit), a.limit <= 0
      since = jnp.full_like(a.limit, state.clock)
    else:  # decoder-only: the prefill's logits give token 0
      tokens = choose(first_logits, a.keys, jnp.zeros_like(a.limit), a.sample, a.temperature, a.top_k, a.top_p)
      out = out.at[:, 0].set(tokens)
      count, done = jnp.ones_like(a.limit), (tokens == eos_id) | (a.limit <= 1)
      since = state.clock - picked(staged.lengths)  # the prompt is left-padded
    return rows(state._replace(
        cache=cache, since=put(state.since, since), tokens=put(state.tokens, tokens), count=put(state.count, count),
        limit=put(state.limit, a.limit), done=put(state.done, done), out=put(state.out, out),
        keys=put(state.keys, a.keys), sample=put(state.sample, a.sample),
        temperature=put(state.temperature, a.temperature), top_k=put(state.top_k, a.top_k),
        top_p=put(state.top_p, a.top_p)))

  def run(weights, state: SlotState, want_free: jax.Array, span: int) -> SlotState:
    """Steps every slot until at least `want_free` slots are done (all of them: pass R), or until a busy slot's
    keys would not fit the last `span` clock values (one of `spans`)."""

    def cond(s):
      return (jnp.sum(s.done) < want_free) & jnp.all(s.done | (s.clock - s.since < span))

    def body(s):
      logits, cache = slot_decoder.step(weights, s.tokens, s.cache, s.clock, span)
      tokens = choose(logits, s.keys, s.count, s.sample, s.temperature, s.top_k, s.top_p,
                      vocab_major=slot_decoder.vocab_major)
      at = jnp.where(s.done, T, s.count)  # finished rows write nothing (index T is dropped)
      out = s.out.at[jnp.arange(R), at].set(tokens, mode="drop")
      count = s.count + (~s.done).astype(jnp.int32)
      done = s.done | (tokens == eos_id) | (count >= s.limit)
      return s._replace(cache=cache, clock=s.clock + 1, tokens=tokens, count=count, done=done, out=out)

    return rows(jax.lax.while_loop(cond, body, state))

  def prepare(params):  # quantized weights dequantized once per request list, or per step (nn/quant.py)
    return slot_decoder.prepare(for_decoding(params, config.dtype))

  return SlotPrograms(jax.jit(prepare), jax.jit(init), jax.jit(stage), jax.jit(admit, donate_argnums=0),
                      jax.jit(run, donate_argnums=1, static_argnames="span"), spans)
