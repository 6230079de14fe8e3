"""Gemma with a static-shape KV cache: prefill a left-padded prompt in one pass, then one token per step.

Full-attention layers keep a (B, K, S_max, H) cache; sliding-window layers keep only a ring buffer of
ring = min(window, S_max) slots (slot a lives at ring index a % ring). Caches are head-major, one array per layer.
The prefill scans over groups of one layer-type period (Gemma 2: 2, Gemma 3: 6) with the period unrolled
inside, so each layer's type and cache shape are static and its compile time does not grow with depth. The
decoding step runs its layers unrolled over per-layer weights prepared once per generate call
(`decode_layer_params`: (out, in) matrices, as `t5.decoder_layer_params` explains) and per-layer caches, so
nothing is sliced, transposed or cast inside the decoding loop. Cache, per row: `key_valid` (B, S_max) marks
real tokens; `next_position` (B,) is the next RoPE position (the count of real tokens so far).
"""

import jax
import jax.numpy as jnp

from t5x_lite.config.gemma import GemmaConfig
from t5x_lite.decoding import kv_cache
from t5x_lite.models import gemma
from t5x_lite.models.family import Decoder, SlotDecoder
from t5x_lite.models.layers import heads_from_feature_major, out_in_matrix, unstack_layers
from t5x_lite.nn import quant
from t5x_lite.nn.attention import cached_attention, dot_product_attention
from t5x_lite.nn.mlp import ACTIVATIONS
from t5x_lite.nn.norms import rms_norm
from t5x_lite.nn.positions import apply_rope, rope_inverse_frequencies


def layer_period(sliding: tuple[bool, ...]) -> int:
  """Smallest p such that layer i has the type of layer i % p (the whole stack when nothing repeats)."""
  for p in range(1, len(sliding) + 1):
    if all(sliding[i] == sliding[i % p] for i in range(len(sliding))):
      return p
  return len(sliding)


def ring_size(config: GemmaConfig, max_length: int) -> int:
  return max_length if config.sliding_window is None else min(config.sliding_window, max_length)


def _run_layers(config: GemmaConfig, x, layer_fn):
  """Runs `layer_fn(x, layer_index, sliding) -> (x, out)` over the stack, scanning over layer-type periods;
  returns x and the list of every layer's `out`."""
  sliding = config.sliding_layers
  p = layer_period(sliding)
  G, r = divmod(len(sliding), p)

  def group(x, g):
    outs = []
    for j in range(p):
      x, out = layer_fn(x, g * p + j, sliding[j])
      outs.append(out)
    return x, outs

  x, stacked = jax.lax.scan(group, x, jnp.arange(G))  # stacked[j]: layer g*p + j's out on a leading G axis
  outs = [jax.tree.map(lambda y, g=g, j=j: y[g], stacked[j]) for g in range(G) for j in range(p)]
  for j in range(r):  # a last, partial period (Gemma 3 1B: 26 = 4 x 6 + 2)
    x, out = layer_fn(x, G * p + j, sliding[j])
    outs.append(out)
  return x, outs


def _layer_params(params, i):
  return jax.tree.map(lambda w: jax.lax.dynamic_index_in_dim(w, i, 0, keepdims=False), params["layers"])


def _setup(config: GemmaConfig):
  inv = {False: rope_inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling),
         True: rope_inverse_frequencies(config.head_dim, config.rope_local_theta)}
  scale = (config.query_pre_attn_scalar or config.head_dim) ** -0.5
  return inv, scale


def _embed(params, config, ids_BT):
  return gemma.embed_tokens(params["embed"], config, ids_BT)


def _finish(params, config, x_BD):
  x = rms_norm(x_BD, params["final_norm"]["scale"], eps=config.rms_norm_eps, zero_centered=True)
  return gemma.lm_logits(params, config, x).astype(jnp.float32)


def prompt_keys(params: dict, config: GemmaConfig, input_ids_BP: jax.Array,
                attention_mask_BP: jax.Array) -> tuple[jax.Array, list[tuple[jax.Array, jax.Array]]]:
  """Runs the (left-padded) prompt through the stack: the float32 logits (B, V) at the last prompt slot and each
  layer's keys and values (B, P, K, H), as the cache holds them."""
  B, P = input_ids_BP.shape
  inv, scale = _setup(config)
  positions = gemma.positions_from_mask(attention_mask_BP)
  full_mask, window_mask = gemma._layer_masks(config, B, P, attention_mask_BP, None)  # pylint: disable=protected-access

  def layer(x, i, sliding):
    kv = {}

    def attend(q, k, v):
      kv["k"], kv["v"] = k, v
      return dot_product_attention(q, k, v, mask=window_mask if sliding else full_mask, scale=scale,
                                   softcap=config.attn_logit_softcap)

    x = gemma.layer_block(config, _layer_params(params, i), x, positions, inv[sliding], attend)
    return x, (kv["k"], kv["v"])

  x, kvs = _run_layers(config, _embed(params, config, input_ids_BP), layer)
  return _finish(params, config, x[:, -1:])[:, 0], kvs


def prefill(params: dict, config: GemmaConfig, input_ids_BP: jax.Array, attention_mask_BP: jax.Array,
            max_length: int) -> tuple[jax.Array, dict]:
  """Runs the (left-padded) prompt through the stack and returns the float32 logits (B, V) at the last prompt
  slot and the cache for `max_length` slots with slots [0, P) filled."""
  B, P = input_ids_BP.shape
  logits_BV, kvs = prompt_keys(params, config, input_ids_BP, attention_mask_BP)
  ring = ring_size(config, max_length)
  # Ring index r receives the last prompt slot a < P with a % ring == r (or nothing when a < 0).
  ring_src = (P - 1) - jnp.mod(P - 1 - jnp.arange(ring), ring)
  ring_ok = (ring_src >= 0)[None, None, :, None]
  ring_src = jnp.maximum(ring_src, 0)
  dtype = jnp.dtype(config.dtype)

  def to_cache(y_BPKH, sliding):
    if sliding:
      y_BKRH = y_BPKH.transpose(0, 2, 1, 3)[:, :, ring_src]
      return kv_cache.store(jnp.where(ring_ok, y_BKRH, 0).astype(dtype))
    full = kv_cache.zeros(B, config.num_kv_heads, max_length, config.head_dim, dtype)
    return kv_cache.write(full, y_BPKH, 0)

  sliding = config.sliding_layers
  valid = attention_mask_BP.astype(bool)
  key_valid = jnp.zeros((B, max_length), bool).at[:, :P].set(valid)
  cache = {"k": [to_cache(k, s) for (k, _), s in zip(kvs, sliding)],
           "v": [to_cache(v, s) for (_, v), s in zip(kvs, sliding)],
           "key_valid": key_valid, "next_position": jnp.sum(valid, axis=1).astype(jnp.int32)}
  return logits_BV, cache


def decode_layer_params(params: dict, config: GemmaConfig) -> list[dict]:
  """Per-layer weights for `decode_step`, (out, in) in the compute dtype: q (N*H, D), kv (2, K*H, D), o (D, N*H),
  wi (2, F, D) (gate; up), wo (D, F); norm scales as stored."""
  dtype = jnp.dtype(config.dtype)

  def out_in(kernel, in_dims: int):
    return out_in_matrix(kernel, in_dims, dtype)

  layers = []
  for p in unstack_layers(params["layers"], config.num_layers):
    a = p["attn"]
    layer = {"q": out_in(a["q"], 1), "kv": quant.stack([out_in(a["k"], 1), out_in(a["v"], 1)]),
             "o": out_in(a["o"], 2), "wi": quant.stack([out_in(p["mlp"]["wi_0"], 1), out_in(p["mlp"]["wi_1"], 1)]),
             "wo": out_in(p["mlp"]["wo"], 1)}
    layer.update({name: p[name]["scale"] for name in ("attn_norm", "mlp_norm", "post_attn_norm", "post_mlp_norm")
                  if name in p})
    layer.update({name: a[name]["scale"] for name in ("q_norm", "k_norm") if name in a})
    layers.append(layer)
  return layers


def empty_cache(config: GemmaConfig, batch: int, ring: kv_cache.Ring) -> dict:
  """The cache of a stack that starts decoding from nothing (in-flight slots, T5Gemma 2's decoder): no slot written
  yet, RoPE positions from 0; `ring.length` positions (a sliding layer's own ring when its window is shorter)."""
  dtype = jnp.dtype(config.dtype)
  K, H = config.num_kv_heads, config.head_dim
  max_length = ring.length
  small = ring_size(config, max_length)
  rings = [kv_cache.Ring(small) if sliding and small < max_length else ring for sliding in config.sliding_layers]
  return {"k": [kv_cache.ring_zeros(batch, K, r, H, dtype) for r in rings],
          "v": [kv_cache.ring_zeros(batch, K, r, H, dtype) for r in rings],
          "key_valid": jnp.zeros((batch, max_length), bool), "next_position": jnp.zeros((batch,), jnp.int32)}


def decode_step(params: dict, config: GemmaConfig, layers: list[dict], token_B: jax.Array, slot: jax.Array,
                cache: dict, *, vocab_major: bool = False, cross: dict | None = None,
                span: int | None = None) -> tuple[jax.Array, dict]:
  """Feeds `token_B` at position `slot` (scalar, every row): float32 logits (B, V), or (V, B) with
  `vocab_major` (tied heads only; see `decoding.loop.decode_tokens`), and the updated cache.

  Full-attention caches are rings too (`kv_cache.Ring`) of S_max slots: position `slot` lives at slot % S_max
  (static decoding never wraps; an in-flight batch's shared clock does), and `key_valid` (B, S_max), indexed the
  same way, holds each row's keys. In-flight slots keep a tuple of rings per layer, one per attention span, and
  the step reads the ring of `span` slots (sliding layers whose window is shorter than S_max keep their own small
  ring, read whole).

  `layers` is `decode_layer_params(params, config)`. Activations run feature-major, x (D, B), between the
  (out, in) weight matmuls; q/k norms, RoPE and attention work on (B, 1, heads, H). `cross` ({"k", "v": one
  stored (B, K, S, H) array per layer, "mask": (B, 1, 1, S) or None}) adds keys that join each layer's softmax
  beside its own cache: T5Gemma 2's merged self- and cross-attention.
  """
  B = token_B.shape[0]
  N, K, H = config.num_heads, config.num_kv_heads, config.head_dim
  inv, scale = _setup(config)
  S_max = cache["key_valid"].shape[1]
  span = S_max if span is None else span
  small = ring_size(config, S_max)  # sliding layers' own ring when the window is shorter
  key_valid = jax.lax.dynamic_update_slice(cache["key_valid"], jnp.ones((B, 1), bool), (0, jnp.mod(slot, S_max)))
  positions = cache["next_position"][:, None]
  if config.bidirectional:
    raise ValueError("a bidirectional Gemma 3 has no causal decoding")
  clocks = kv_cache.window_clocks(slot, span)  # the position each key read holds
  valid = kv_cache.window_valid(key_valid, clocks)
  full_mask = valid[:, None, None, :]  # slots after this one are not written yet (or hold no valid key)
  window = config.sliding_window or S_max
  if small == S_max:  # sliding layers read the full layers' keys, those within the window
    window_mask = ((clocks > slot - window)[None, :] & valid)[:, None, None, :]
  else:
    ring_slot = kv_cache.window_clocks(slot, small)
    in_window = (ring_slot >= 0) & (ring_slot > slot - window)
    window_mask = (in_window[None, :] & kv_cache.window_valid(key_valid, ring_slot))[:, None, None, :]
  eps = config.rms_norm_eps
  act = ACTIVATIONS[config.mlp_activation]

  def norm(y, w, axis=0):
    return rms_norm(y, w, eps=eps, zero_centered=True, axis=axis)

  def heads(y_OB, n):  # (n*H, B) -> (B, 1, n, H)
    return heads_from_feature_major(y_OB, n, H)

  x_DB = _embed(params, config, token_B).T
  new_k, new_v = [], []
  for i, (p, sliding) in enumerate(zip(layers, config.sliding_layers)):
    h = norm(x_DB, p["attn_norm"])
    k, v = quant.matmul(p["kv"], h)
    q, k, v = heads(quant.matmul(p["q"], h), N), heads(k, K), heads(v, K)
    if config.qk_norm:
      q, k = norm(q, p["q_norm"], -1), norm(k, p["k_norm"], -1)
    q, k = apply_rope(q, positions, inv[sliding]), apply_rope(k, positions, inv[sliding])
    own_span = small if sliding and small < S_max else span
    new_k.append(kv_cache.ring_write(cache["k"][i], k, slot))
    new_v.append(kv_cache.ring_write(cache["v"][i], v, slot))
    also = None if cross is None else (kv_cache.view(cross["k"][i], B, K), kv_cache.view(cross["v"][i], B, K),
                                       cross["mask"])
    attn = cached_attention(q, kv_cache.view(kv_cache.ring_read(new_k[i], own_span), B, K),
                            kv_cache.view(kv_cache.ring_read(new_v[i], own_span), B, K),
                            mask=window_mask if sliding else full_mask, scale=scale,
                            softcap=config.attn_logit_softcap, also=also)
    h = quant.matmul(p["o"], attn.reshape(B, N * H).T)
    if config.sandwich_norms:
      h = norm(h, p["post_attn_norm"])
    x_DB = x_DB + h
    gate, up = quant.matmul(p["wi"], norm(x_DB, p["mlp_norm"]))
    h = quant.matmul(p["wo"], act(gate) * up)
    if config.sandwich_norms:
      h = norm(h, p["post_mlp_norm"])
    x_DB = x_DB + h
  if vocab_major:
    if not config.tie_lm_head:
      raise ValueError("vocab_major logits need a tied head (an untied (D, V) kernel would be transposed per step)")
    x_DB = norm(x_DB, params["final_norm"]["scale"])
    logits = gemma.final_softcap(config, quant.matmul(params["embed"]["embedding"], x_DB))  # (V, B)
    logits = logits.astype(jnp.float32)
  else:
    logits = _finish(params, config, x_DB.T[:, None])[:, 0]
  return logits, {"k": new_k, "v": new_v, "key_valid": key_valid, "next_position": cache["next_position"] + 1}


def decoder(params: dict, config: GemmaConfig, input_ids_BP: jax.Array, attention_mask_BP: jax.Array, beams: int,
            max_new: int) -> Decoder:
  """Prefill of the (left-padded) prompt, then steps over R = B x beams rows; a tied head may give vocabulary-major
  logits (see decoding/loop.py)."""
  B, P = input_ids_BP.shape
  R = B * beams
  K = config.num_kv_heads
  first_logits_BV, cache = prefill(params, config, input_ids_BP, attention_mask_BP, P + max_new)
  layers = decode_layer_params(params, config)

  def rows(cache, kv_fn, other_fn):
    return {name: [kv_fn(x) for x in xs] if name in ("k", "v") else other_fn(xs) for name, xs in cache.items()}

  if beams > 1:
    cache = rows(cache, lambda x: kv_cache.repeat_rows(x, beams, B, K), lambda x: jnp.repeat(x, beams, axis=0))
    first_logits_BV = jnp.repeat(first_logits_BV, beams, axis=0)

  def step(tokens_R, cache, t, vocab_major=False):
    return decode_step(params, config, layers, tokens_R, P + t - 1, cache, vocab_major=vocab_major)

  def reorder(cache, rows_R):
    return rows(cache, lambda x: kv_cache.take_rows(x, rows_R, R, K), lambda x: jnp.take(x, rows_R, axis=0))

  return Decoder(step, cache, None, first_logits_BV, reorder, vocab_major=config.tie_lm_head)


def write_prompts(config: GemmaConfig, cache: dict, rows_A: jax.Array, kvs: list, mask_AP: jax.Array,
                  g: jax.Array) -> dict:
  """`cache` (R slots, `empty_cache(.., ring)`'s layout) with rows `rows_A` holding prompts (their keys and values
  `kvs`, as `prompt_keys` gives them) at the clock values [g - P, g) (each ring of n slots takes the last n of
  them, kv_cache.ring_put); `key_valid` the prompts' mask; positions continue them."""
  R, S = cache["key_valid"].shape
  A, P = mask_AP.shape
  K = config.num_kv_heads
  clock = g - P + jnp.arange(P)
  k, v = [], []
  for (k_APKH, v_APKH), old_k, old_v in zip(kvs, cache["k"], cache["v"]):
    k.append(kv_cache.ring_put(old_k, rows_A, k_APKH.transpose(0, 2, 1, 3), R, K, clock))
    v.append(kv_cache.ring_put(old_v, rows_A, v_APKH.transpose(0, 2, 1, 3), R, K, clock))
  valid = jnp.zeros((A, S), bool).at[:, jnp.mod(clock, S)].set(mask_AP.astype(bool))
  return {**cache, "k": k, "v": v, "key_valid": cache["key_valid"].at[rows_A].set(valid, mode="drop"),
          "next_position": cache["next_position"].at[rows_A].set(jnp.sum(mask_AP, axis=1).astype(jnp.int32),
                                                                 mode="drop")}


def slot_decoder(config: GemmaConfig, slots: int, input_length: int, ring: kv_cache.Ring) -> SlotDecoder:
  """The decoder over R = `slots` requests whose prompt and new tokens together fit `ring.length` positions (the
  caller keeps input_length + new tokens <= ring.length): a request's prompt is prefilled, its keys and values
  padded on the left to `input_length` E, and written into its row when it enters a slot."""
  E = input_length

  def prepare(params):
    return {"params": params, "layers": decode_layer_params(params, config)}

  def init():
    return empty_cache(config, slots, ring)

  def encode_requests(weights, ids_AP, mask_AP, extra):  # pylint: disable=unused-argument
    logits_AV, kvs = prompt_keys(weights["params"], config, ids_AP, mask_AP)
    P = ids_AP.shape[1]

    def padded(y_APKH):
      return jnp.pad(y_APKH, ((0, 0), (E - P, 0), (0, 0), (0, 0)))

    return {"kvs": [(padded(k), padded(v)) for k, v in kvs],
            "mask": jnp.pad(mask_AP.astype(bool), ((0, 0), (E - P, 0)))}, logits_AV

  def place(cache, rows_A, staged, g):
    return write_prompts(config, cache, rows_A, staged["kvs"], staged["mask"], g)

  def step(weights, tokens_R, cache, g, span):
    return decode_step(weights["params"], config, weights["layers"], tokens_R, g, cache, span=span,
                       vocab_major=config.tie_lm_head)

  return SlotDecoder(prepare, init, encode_requests, place, step, None, vocab_major=config.tie_lm_head)
