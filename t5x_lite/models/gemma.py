"""Gemma 1, 2 and 3 (text) decoder-only models as pure functions over a params pytree.

Params (L layers):
  embed/embedding (V, D)                      tied LM head (lm_head/kernel (D, V) when a checkpoint unties it)
  layers/attn_norm/scale (L, D)               before attention (transformers: input_layernorm)
  layers/attn/q (L, D, N, H), k, v (L, D, K, H), o (L, N, H, D)
  layers/attn/{q_norm,k_norm}/scale (L, H)    Gemma 3
  layers/post_attn_norm/scale (L, D)          Gemma 2/3 (sandwich norms)
  layers/mlp_norm/scale (L, D)                before the MLP
  layers/mlp/{wi_0 (gate), wi_1 (up)} (L, D, F), mlp/wo (L, F, D)
  layers/post_mlp_norm/scale (L, D)           Gemma 2/3
  final_norm/scale (D,)
  score/{kernel (D, labels), bias}            classification heads
All norm scales are zero-centred (effective scale 1 + w). Sliding and full layers share one scanned layer
function; each layer's type selects its mask and RoPE table inside the scan.
"""

import math

import jax
import jax.numpy as jnp

from t5x_lite import sharding
from t5x_lite.config.gemma import GemmaConfig
from t5x_lite.models.layers import Attention, Stack, dense, embed, scan_layers, split_rng
from t5x_lite.models.params import ParamSpec, count_params
from t5x_lite.nn import masks, quant
from t5x_lite.nn.attention import dot_product_attention, merge_heads, project_heads
from t5x_lite.nn.dropout import dropout
from t5x_lite.nn.mlp import mlp
from t5x_lite.nn.norms import rms_norm
from t5x_lite.nn.positions import apply_rope, rope_inverse_frequencies

_ACT_BTD = ("act_batch", "act_length", "act_embed")
_INIT_STD = 0.02  # transformers' initializer_range for Gemma


def layer_specs(config: GemmaConfig) -> dict:
  """The stacked layers' params (L on the leading axis), as a Gemma stack lays them out."""
  D, N, K, H, F, L = (config.d_model, config.num_heads, config.num_kv_heads, config.head_dim, config.d_ff,
                      config.num_layers)

  def norm(*shape):
    return {"scale": ParamSpec((L, *shape), ("layers", "norm"), init="zeros")}

  def w(shape, axes):
    return ParamSpec((L, *shape), ("layers", *axes), scale=_INIT_STD)

  attn = {"q": w((D, N, H), ("embed", "heads", "kv")), "k": w((D, K, H), ("embed", "kv_heads", "kv")),
          "v": w((D, K, H), ("embed", "kv_heads", "kv")), "o": w((N, H, D), ("heads", "kv", "embed"))}
  if config.qk_norm:
    attn.update(q_norm=norm(H), k_norm=norm(H))
  layers = {"attn_norm": norm(D), "attn": attn, "mlp_norm": norm(D),
            "mlp": {"wi_0": w((D, F), ("embed", "mlp")), "wi_1": w((D, F), ("embed", "mlp")),
                    "wo": w((F, D), ("mlp", "embed"))}}
  if config.sandwich_norms:
    layers.update(post_attn_norm=norm(D), post_mlp_norm=norm(D))
  return layers


def embed_specs(config: GemmaConfig) -> dict:
  """The token embedding (V, D), and the end-of-image vector (D,) of a config with `eoi_token_id`."""
  specs = {"embedding": ParamSpec((config.vocab_size, config.d_model), ("vocab", "embed"), scale=_INIT_STD)}
  if config.eoi_token_id is not None:
    specs["eoi"] = ParamSpec((config.d_model,), ("embed",), init="zeros")
  return specs


def param_specs(config: GemmaConfig) -> dict:
  D, V = config.d_model, config.vocab_size
  specs = {"embed": embed_specs(config), "layers": layer_specs(config),
           "final_norm": {"scale": ParamSpec((D,), ("norm",), init="zeros")}}
  if config.task == "lm" and not config.tie_lm_head:
    specs["lm_head"] = {"kernel": ParamSpec((D, V), ("embed", "vocab"), scale=_INIT_STD)}
  elif config.task in ("seq_cls", "token_cls"):
    specs["score"] = {"kernel": ParamSpec((D, config.num_labels), ("embed", "labels"), scale=_INIT_STD)}
    if config.task == "token_cls" and config.token_classification_bias:
      specs["score"]["bias"] = ParamSpec((config.num_labels,), ("labels",), init="zeros")
  return specs


def positions_from_mask(attention_mask_BT: jax.Array) -> jax.Array:
  """Left padding: real tokens count 0, 1, 2, ... from the first one; pads get 0 (transformers' generate)."""
  return jnp.maximum(jnp.cumsum(attention_mask_BT.astype(jnp.int32), axis=-1) - 1, 0)


def _layer_masks(config: GemmaConfig, B: int, T: int, attention_mask_BT, segment_ids_BT):
  """(full-attention mask, sliding-window mask), each (B, 1, T, T)."""
  slots = masks.slot_index(B, T)
  common = masks.combine(
      None if attention_mask_BT is None else masks.key_padding_mask(attention_mask_BT),
      None if segment_ids_BT is None else masks.segment_mask(segment_ids_BT, segment_ids_BT))
  w = config.sliding_window
  if config.bidirectional:
    # Gemma 3 bidirectional: transformers keeps |q - k| < w//2 + 1 in sliding layers, everything in full ones.
    full = masks.sliding_window_mask(slots, slots, left=T, right=T)
    window = None if w is None else masks.sliding_window_mask(slots, slots, left=w // 2, right=w // 2)
  else:
    full = masks.causal_mask(slots, slots)
    window = None if w is None else masks.sliding_window_mask(slots, slots, left=w - 1, right=0)
  full = masks.combine(full, common)
  return full, (full if window is None else masks.combine(full, window))


def embed_tokens(embed_params: dict, config: GemmaConfig, ids_BT: jax.Array) -> jax.Array:
  """(B, T, D) embeddings in the compute dtype, scaled by sqrt(D) rounded to that dtype as transformers does
  (bf16: 33.94 -> 34.0); with `eoi_token_id`, that token gets the unscaled `eoi` vector instead (T5Gemma 2)."""
  dtype = jnp.dtype(config.dtype)
  x = embed(embed_params["embedding"], ids_BT, dtype) * jnp.asarray(math.sqrt(config.d_model), dtype)
  if config.eoi_token_id is not None:
    x = jnp.where((ids_BT == config.eoi_token_id)[..., None], embed_params["eoi"].astype(dtype), x)
  return x


def layer_block(config: GemmaConfig, p: dict, x_BTD: jax.Array, positions_BT: jax.Array, inv_freq: jax.Array,
                attend) -> jax.Array:
  """One Gemma layer on x (B, T, D); `attend(q_BTNH, k_BTKH, v_BTKH) -> (B, T, N, H)` is the attention itself
  (masked in the forward pass, cache-backed when decoding), so both share every other line."""
  eps = config.rms_norm_eps

  def norm(y, n):
    return rms_norm(y, n["scale"], eps=eps, zero_centered=True)

  h = norm(x_BTD, p["attn_norm"])
  a = p["attn"]
  q, k, v = project_heads(h, a["q"]), project_heads(h, a["k"]), project_heads(h, a["v"])
  if config.qk_norm:
    q, k = norm(q, a["q_norm"]), norm(k, a["k_norm"])
  q, k = apply_rope(q, positions_BT, inv_freq), apply_rope(k, positions_BT, inv_freq)
  h = merge_heads(attend(q, k, v), a["o"])
  if config.sandwich_norms:
    h = norm(h, p["post_attn_norm"])
  x = x_BTD + h
  h = mlp(p["mlp"], norm(x, p["mlp_norm"]), activation=config.mlp_activation, gated=True)
  if config.sandwich_norms:
    h = norm(h, p["post_mlp_norm"])
  return x + h


def hidden_states(params: dict, config: GemmaConfig, input_ids_BT: jax.Array,
                  attention_mask_BT: jax.Array | None = None, *, positions_BT: jax.Array | None = None,
                  segment_ids_BT: jax.Array | None = None) -> jax.Array:
  """Final-normed hidden states (B, T, D) in the compute dtype.

  Positions default to the running count of real tokens (left padding allowed); packed inputs pass
  `segment_ids_BT` and `positions_BT`.
  """
  B, T = input_ids_BT.shape
  if positions_BT is None:
    positions_BT = masks.slot_index(B, T) if attention_mask_BT is None else positions_from_mask(attention_mask_BT)
  full_mask, window_mask = _layer_masks(config, B, T, attention_mask_BT, segment_ids_BT)
  x = sharding.constrain(embed_tokens(params["embed"], config, input_ids_BT), _ACT_BTD)
  x = run_stack(params["layers"], config, x, positions_BT, full_mask, window_mask)
  return rms_norm(x, params["final_norm"]["scale"], eps=config.rms_norm_eps, zero_centered=True)


def run_stack(layers: dict, config: GemmaConfig, x_BTD: jax.Array, positions_BT: jax.Array, full_mask, window_mask,
              *, extra_keys=None, extra_mask=None) -> jax.Array:
  """The stacked layers on embedded x (B, T, D), scanned; each layer's type picks its mask and RoPE table.

  `extra_keys(layer_params) -> (k_BSKH, v_BSKH)` adds keys that join every layer's softmax after the layer's
  own (T5Gemma 2's encoder states, `extra_mask` (B, 1, T, S) saying which each query may read).
  """
  inv_freq_full = rope_inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
  inv_freq_local = rope_inverse_frequencies(config.head_dim, config.rope_local_theta)
  scale = (config.query_pre_attn_scalar or config.head_dim) ** -0.5

  def layer(x, p_and_type, _):
    p, sliding = p_and_type
    mask = jnp.where(sliding, window_mask, full_mask)
    inv_freq = jnp.where(sliding, inv_freq_local, inv_freq_full)

    def attend(q, k, v):
      m = mask
      if extra_keys is not None:
        k_extra, v_extra = extra_keys(p)
        k, v = jnp.concatenate([k, k_extra], axis=1), jnp.concatenate([v, v_extra], axis=1)
        m = masks.join_keys(m, extra_mask)
      return dot_product_attention(q, k, v, mask=m, scale=scale, softcap=config.attn_logit_softcap)

    return sharding.constrain(layer_block(config, p, x, positions_BT, inv_freq, attend), _ACT_BTD)

  sliding = jnp.asarray(config.sliding_layers)
  return scan_layers(layer, x_BTD, (layers, sliding), num_layers=config.num_layers, remat=config.remat)


def lm_logits(params: dict, config: GemmaConfig, hidden_BTD: jax.Array) -> jax.Array:
  """(B, T, V) logits, soft-capped when the config says so."""
  if config.tie_lm_head:
    logits = jnp.einsum("BTD,VD->BTV", hidden_BTD, quant.weight(params["embed"]["embedding"], hidden_BTD.dtype))
  else:
    logits = hidden_BTD @ quant.weight(params["lm_head"]["kernel"], hidden_BTD.dtype)
  return sharding.constrain(final_softcap(config, logits), ("act_batch", "act_length", "act_vocab"))


def final_softcap(config: GemmaConfig, logits: jax.Array) -> jax.Array:
  """The final logit soft-cap (Gemma 2), in float32, or the logits unchanged."""
  if config.final_logit_softcap is None:
    return logits
  cap = config.final_logit_softcap
  return jnp.tanh(logits.astype(jnp.float32) / cap) * cap


def forward(params: dict, config: GemmaConfig, input_ids_BT: jax.Array, attention_mask_BT: jax.Array | None = None,
            *, rng: jax.Array | None = None, positions_BT: jax.Array | None = None,
            segment_ids_BT: jax.Array | None = None) -> jax.Array:
  """The task's output in float32: lm (B, T, V); token_cls (B, T, labels); seq_cls (B, labels), read at each
  row's rightmost non-pad token as transformers does."""
  hidden = hidden_states(params, config, input_ids_BT, attention_mask_BT, positions_BT=positions_BT,
                         segment_ids_BT=segment_ids_BT)
  if config.task == "lm":
    return lm_logits(params, config, hidden).astype(jnp.float32)
  if config.task == "token_cls":
    (key,) = split_rng(rng, 1)
    return dense(dropout(hidden, config.classifier_dropout, key), params["score"]).astype(jnp.float32)
  logits_BTL = dense(hidden, params["score"])
  T = input_ids_BT.shape[1]
  last_BT = jnp.argmax(jnp.arange(T) * (input_ids_BT != config.pad_token_id), axis=-1)
  return jnp.take_along_axis(logits_BTL, last_BT[:, None, None], axis=1)[:, 0].astype(jnp.float32)


def batch_logits(params: dict, config: GemmaConfig, batch: dict, rng: jax.Array | None) -> jax.Array:
  """Logits (B, L, V) of a packed decoder-only training batch (positions restart in every segment)."""
  return forward(params, config, batch["input_ids"], None, rng=rng, positions_BT=batch["positions"],
                 segment_ids_BT=batch["segment_ids"])


def forward_flops_per_token(config: GemmaConfig) -> dict[str, float]:
  """2 x the weights a token passes through (the embedding counts as the tied head's; untied, the lookup is no
  matmul and lm_head is)."""
  specs = param_specs(config)
  return {"segment_ids": 2.0 * (count_params(specs) - (0 if config.tie_lm_head else count_params(specs["embed"])))}


def activation_stacks(config: GemmaConfig, lengths: dict[str, int]) -> tuple[Stack, ...]:
  """One stack over the T positions of a row; a sliding layer's logits are computed in full and masked, so every
  layer attends to T keys."""
  T = lengths["segment_ids"]
  return (Stack(config.num_layers, T, config.d_model,
                (Attention(T, config.num_heads, config.num_kv_heads, config.head_dim),), config.d_ff, 2),)
