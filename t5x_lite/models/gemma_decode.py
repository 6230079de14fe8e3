"""Gemma with a static-shape KV cache: prefill a left-padded prompt in one pass, then one token per step.

Full-attention layers keep a (B, S_max) cache; sliding-window layers keep only a ring buffer of
R = min(window, S_max) slots (slot a lives at ring index a % R). Layer types follow a repeating pattern
(Gemma 2: period 2, Gemma 3: period 6), so the stack is scanned over groups of one period with the period
unrolled inside: each layer's type, and so its cache shape, is static, and compile time does not grow with
depth. Cache, per row: `key_valid` (B, S_max) marks real tokens; `next_position` (B,) is the next RoPE
position (the count of real tokens so far).
"""

import math

import jax
import jax.numpy as jnp

from t5x_lite.config.gemma import GemmaConfig
from t5x_lite.models import gemma
from t5x_lite.models.layers import embed
from t5x_lite.nn import masks
from t5x_lite.nn.attention import dot_product_attention
from t5x_lite.nn.norms import rms_norm
from t5x_lite.nn.positions import rope_inverse_frequencies


def layer_period(sliding: tuple[bool, ...]) -> int:
  """Smallest p such that layer i has the type of layer i % p (the whole stack when nothing repeats)."""
  for p in range(1, len(sliding) + 1):
    if all(sliding[i] == sliding[i % p] for i in range(len(sliding))):
      return p
  return len(sliding)


def ring_size(config: GemmaConfig, max_length: int) -> int:
  return max_length if config.sliding_window is None else min(config.sliding_window, max_length)


def init_cache(config: GemmaConfig, batch: int, max_length: int) -> dict:
  sliding = config.sliding_layers
  n_slide = sum(sliding)
  dtype = jnp.dtype(config.dtype)
  kv = (batch, config.num_kv_heads, config.head_dim)
  R = ring_size(config, max_length)

  def zeros(n, length):
    return jnp.zeros((n, kv[0], length, *kv[1:]), dtype)

  return {"full_k": zeros(len(sliding) - n_slide, max_length), "full_v": zeros(len(sliding) - n_slide, max_length),
          "slide_k": zeros(n_slide, R), "slide_v": zeros(n_slide, R),
          "key_valid": jnp.zeros((batch, max_length), bool), "next_position": jnp.zeros((batch,), jnp.int32)}


def _run_layers(config: GemmaConfig, x, caches, layer_fn):
  """Runs `layer_fn(x, caches, layer_index, type_index, sliding)` over the stack, scanning over periods."""
  sliding = config.sliding_layers
  p = layer_period(sliding)
  G, r = divmod(len(sliding), p)
  per_group = (sum(not s for s in sliding[:p]), sum(sliding[:p]))  # (full, sliding) layers per period
  rank = [sum(sliding[k] == sliding[j] for k in range(j)) for j in range(p)]

  def group(carry, g):
    x, caches = carry
    for j in range(p):
      x, caches = layer_fn(x, caches, g * p + j, g * per_group[sliding[j]] + rank[j], sliding[j])
    return (x, caches), None

  (x, caches), _ = jax.lax.scan(group, (x, caches), jnp.arange(G))
  for j in range(r):  # a last, partial period (Gemma 3 1B: 26 = 4 x 6 + 2)
    x, caches = layer_fn(x, caches, G * p + j, G * per_group[sliding[j]] + rank[j], sliding[j])
  return x, caches


def _layer_params(params, i):
  return jax.tree.map(lambda w: jax.lax.dynamic_index_in_dim(w, i, 0, keepdims=False), params["layers"])


def _setup(config: GemmaConfig):
  inv = {False: rope_inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling),
         True: rope_inverse_frequencies(config.head_dim, config.rope_local_theta)}
  scale = (config.query_pre_attn_scalar or config.head_dim) ** -0.5
  return inv, scale


def _embed(params, config, ids_BT):
  dtype = jnp.dtype(config.dtype)
  return embed(params["embed"]["embedding"], ids_BT, dtype) * jnp.asarray(math.sqrt(config.d_model), dtype)


def _finish(params, config, x_BD):
  x = rms_norm(x_BD, params["final_norm"]["scale"], eps=config.rms_norm_eps, zero_centered=True)
  return gemma.lm_logits(params, config, x).astype(jnp.float32)


def prefill(params: dict, config: GemmaConfig, input_ids_BP: jax.Array, attention_mask_BP: jax.Array,
            cache: dict) -> tuple[jax.Array, dict]:
  """Runs the (left-padded) prompt through the stack, fills slots [0, P) of the cache, and returns the float32
  logits (B, V) at the last prompt slot."""
  B, P = input_ids_BP.shape
  inv, scale = _setup(config)
  positions = gemma.positions_from_mask(attention_mask_BP)
  full_mask, window_mask = gemma._layer_masks(config, B, P, attention_mask_BP, None)  # pylint: disable=protected-access
  R = cache["slide_k"].shape[2]
  # Ring index r receives the last prompt slot a < P with a % R == r (or nothing when a < 0).
  ring_src = (P - 1) - jnp.mod(P - 1 - jnp.arange(R), R)
  ring_ok = (ring_src >= 0)[None, :, None, None]
  ring_src = jnp.maximum(ring_src, 0)

  def layer(x, caches, i, ti, sliding):
    def attend(q, k, v):
      if sliding:
        caches["slide_k"] = caches["slide_k"].at[ti].set(jnp.where(ring_ok, k[:, ring_src], 0).astype(k.dtype))
        caches["slide_v"] = caches["slide_v"].at[ti].set(jnp.where(ring_ok, v[:, ring_src], 0).astype(v.dtype))
      else:
        caches["full_k"] = jax.lax.dynamic_update_slice(caches["full_k"], k[None], (ti, 0, 0, 0, 0))
        caches["full_v"] = jax.lax.dynamic_update_slice(caches["full_v"], v[None], (ti, 0, 0, 0, 0))
      return dot_product_attention(q, k, v, mask=window_mask if sliding else full_mask, scale=scale,
                                   softcap=config.attn_logit_softcap)

    caches = dict(caches)
    return gemma.layer_block(config, _layer_params(params, i), x, positions, inv[sliding], attend), caches

  kv = {k: cache[k] for k in ("full_k", "full_v", "slide_k", "slide_v")}
  x, kv = _run_layers(config, _embed(params, config, input_ids_BP), kv, layer)
  valid = attention_mask_BP.astype(bool)
  key_valid = jax.lax.dynamic_update_slice(cache["key_valid"], valid, (0, 0))
  next_position = jnp.sum(valid, axis=1).astype(jnp.int32)
  return _finish(params, config, x[:, -1:])[:, 0], {**kv, "key_valid": key_valid, "next_position": next_position}


def decode_step(params: dict, config: GemmaConfig, token_B: jax.Array, slot: jax.Array,
                cache: dict) -> tuple[jax.Array, dict]:
  """Feeds `token_B` at cache slot `slot` (scalar, every row): float32 logits (B, V) and the updated cache."""
  B = token_B.shape[0]
  inv, scale = _setup(config)
  S_max = cache["key_valid"].shape[1]
  R = cache["slide_k"].shape[2]
  key_valid = jax.lax.dynamic_update_slice(cache["key_valid"], jnp.ones((B, 1), bool), (0, slot))
  positions = cache["next_position"][:, None]
  slots = jnp.arange(S_max)
  if config.bidirectional:
    raise ValueError("a bidirectional Gemma 3 has no causal decoding")
  full_mask = (key_valid & (slots <= slot)[None, :])[:, None, None, :]
  ring_slot = slot - jnp.mod(slot - jnp.arange(R), R)  # the absolute slot each ring index holds now
  in_window = (ring_slot >= 0) & (ring_slot > slot - (config.sliding_window or S_max))
  window_mask = (in_window[None, :] & jnp.take(key_valid, jnp.maximum(ring_slot, 0), axis=1))[:, None, None, :]
  ring_index = jnp.mod(slot, R)

  def layer(x, caches, i, ti, sliding):
    def attend(q, k, v):
      name, index, mask = ("slide", ring_index, window_mask) if sliding else ("full", slot, full_mask)
      caches[f"{name}_k"] = jax.lax.dynamic_update_slice(caches[f"{name}_k"], k[None], (ti, 0, index, 0, 0))
      caches[f"{name}_v"] = jax.lax.dynamic_update_slice(caches[f"{name}_v"], v[None], (ti, 0, index, 0, 0))
      return dot_product_attention(q, caches[f"{name}_k"][ti], caches[f"{name}_v"][ti], mask=mask, scale=scale,
                                   softcap=config.attn_logit_softcap)

    caches = dict(caches)
    return gemma.layer_block(config, _layer_params(params, i), x, positions, inv[sliding], attend), caches

  kv = {k: cache[k] for k in ("full_k", "full_v", "slide_k", "slide_v")}
  x, kv = _run_layers(config, _embed(params, config, token_B[:, None]), kv, layer)
  return _finish(params, config, x)[:, 0], {**kv, "key_valid": key_valid,
                                            "next_position": cache["next_position"] + 1}
