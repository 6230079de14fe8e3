"""T5, T5v1.1, mT5 and umT5 as pure functions over a params pytree.

Params (L = layers of that stack, X = relative-position buckets):
  embed/embedding (V, D)                       shared by encoder, decoder and (when tied) the LM head
  encoder/relpos (X, N)                        bias table of block 0, reused by every layer (umT5: per layer)
  encoder/layers/{attn_norm,mlp_norm}/scale (L, D)
  encoder/layers/attn/{q,k,v} (L, D, N, H), attn/o (L, N, H, D)
  encoder/layers/mlp/{wi_0,wi_1 | wi} (L, D, F), mlp/wo (L, F, D)
  encoder/final_norm/scale (D,)
  decoder/...                                  the same plus cross_norm and cross_attn per layer
  lm_head/kernel (D, V)                        only when untied (T5v1.1, Flan-T5)
  heads: cls_head {dense, out} | classifier | qa_head, each {kernel, bias}
T5 quirks kept on purpose: no 1/sqrt(H) attention scaling; the bias comes from relative bucketed positions
(bidirectional in the encoder, causal in the decoder, none in cross-attention); tied logits are scaled by
D**-0.5 only when `scale_decoder_outputs`.
"""

import jax
import jax.numpy as jnp

from t5x_lite import sharding
from t5x_lite.config import T5Config
from t5x_lite.models.layers import dense, embed, scan_layers, split_rng
from t5x_lite.models.params import ParamSpec
from t5x_lite.nn import masks
from t5x_lite.nn.attention import dot_product_attention, merge_heads, project_heads
from t5x_lite.nn.dropout import dropout
from t5x_lite.nn.mlp import mlp
from t5x_lite.nn.norms import rms_norm
from t5x_lite.nn.positions import relative_position_bias

_ACT_BTD = ("act_batch", "act_length", "act_embed")


# ----------------------------------------------------------------------------------------------- params

def param_specs(config: T5Config) -> dict:
  """The params tree as `ParamSpec`s (shapes, logical axes, T5's initialisers)."""
  D, N, H, F, V = config.d_model, config.num_heads, config.head_dim, config.d_ff, config.vocab_size
  X = config.relative_attention_num_buckets

  def attention(L):
    return {
        "q": ParamSpec((L, D, N, H), ("layers", "embed", "heads", "kv"), scale=(D * H) ** -0.5),
        "k": ParamSpec((L, D, N, H), ("layers", "embed", "heads", "kv"), scale=D ** -0.5),
        "v": ParamSpec((L, D, N, H), ("layers", "embed", "heads", "kv"), scale=D ** -0.5),
        "o": ParamSpec((L, N, H, D), ("layers", "heads", "kv", "embed"), scale=(N * H) ** -0.5),
    }

  def norm(L):
    return {"scale": ParamSpec((L, D), ("layers", "norm"), init="ones")}

  def feed_forward(L):
    wi = {"wi_0": None, "wi_1": None} if config.mlp_gated else {"wi": None}
    out = {k: ParamSpec((L, D, F), ("layers", "embed", "mlp"), scale=D ** -0.5) for k in wi}
    out["wo"] = ParamSpec((L, F, D), ("layers", "mlp", "embed"), scale=F ** -0.5)
    return out

  def stack(L, cross: bool):
    layers = {"attn_norm": norm(L), "attn": attention(L), "mlp_norm": norm(L), "mlp": feed_forward(L)}
    if cross:
      layers.update(cross_norm=norm(L), cross_attn=attention(L))
    out = {"layers": layers, "final_norm": {"scale": ParamSpec((D,), ("norm",), init="ones")}}
    if config.relative_bias_per_layer:
      layers["relpos"] = ParamSpec((L, X, N), ("layers", "relpos_buckets", "heads"), scale=D ** -0.5)
    else:
      out["relpos"] = ParamSpec((X, N), ("relpos_buckets", "heads"), scale=D ** -0.5)
    return out

  def linear(d_in, d_out, axes):
    return {"kernel": ParamSpec((d_in, d_out), axes, scale=d_in ** -0.5),
            "bias": ParamSpec((d_out,), axes[1:], init="zeros")}

  specs = {"embed": {"embedding": ParamSpec((V, D), ("vocab", "embed"))},
           "encoder": stack(config.num_encoder_layers, cross=False)}
  if config.is_encoder_decoder:
    specs["decoder"] = stack(config.num_decoder_layers, cross=True)
  if config.task == "lm" and not config.tie_lm_head:
    specs["lm_head"] = {"kernel": ParamSpec((D, V), ("embed", "vocab"), scale=D ** -0.5)}
  elif config.task == "seq_cls":
    specs["cls_head"] = {"dense": linear(D, D, ("embed", None)), "out": linear(D, config.num_labels,
                                                                                ("embed", "labels"))}
  elif config.task == "token_cls":
    specs["classifier"] = linear(D, config.num_labels, ("embed", "labels"))
  elif config.task == "qa":
    specs["qa_head"] = linear(D, config.num_labels, ("embed", "labels"))
  return specs


# ---------------------------------------------------------------------------------------------- forward

def _attention(params: dict, x_BTD: jax.Array, kv_BSD: jax.Array, *, mask, bias) -> jax.Array:
  q = project_heads(x_BTD, params["q"])
  k = project_heads(kv_BSD, params["k"])
  v = project_heads(kv_BSD, params["v"])
  return merge_heads(dot_product_attention(q, k, v, mask=mask, bias=bias, scale=1.0), params["o"])


def _relpos_bias(config: T5Config, table, q_pos, k_pos, bidirectional: bool):
  return relative_position_bias(table, q_pos, k_pos, bidirectional=bidirectional,
                                max_distance=config.relative_attention_max_distance)


def encode(params: dict, config: T5Config, input_ids_BS: jax.Array, attention_mask_BS: jax.Array | None = None,
           *, segment_ids_BS: jax.Array | None = None, positions_BS: jax.Array | None = None,
           rng: jax.Array | None = None) -> jax.Array:
  """Final encoder hidden states (B, S, D) in the compute dtype.

  `segment_ids_BS`/`positions_BS` describe packed examples (no attention across segments, positions restart);
  `rng` turns dropout on.
  """
  B, S = input_ids_BS.shape
  dtype = jnp.dtype(config.dtype)
  rate = config.dropout_rate
  rng_embed, rng_layers, rng_final = split_rng(rng, 3)
  positions = masks.slot_index(B, S) if positions_BS is None else positions_BS
  mask = masks.combine(None if attention_mask_BS is None else masks.key_padding_mask(attention_mask_BS),
                       None if segment_ids_BS is None else masks.segment_mask(segment_ids_BS, segment_ids_BS))
  enc = params["encoder"]
  shared_bias = None if config.relative_bias_per_layer else _relpos_bias(config, enc["relpos"], positions,
                                                                         positions, True)
  x = sharding.constrain(dropout(embed(params["embed"]["embedding"], input_ids_BS, dtype), rate, rng_embed),
                         _ACT_BTD)

  def layer(x, p, key):
    k_res1, k_mlp, k_res2 = split_rng(key, 3)
    bias = shared_bias if shared_bias is not None else _relpos_bias(config, p["relpos"], positions, positions, True)
    h = rms_norm(x, p["attn_norm"]["scale"], eps=config.layer_norm_epsilon)
    x = x + dropout(_attention(p["attn"], h, h, mask=mask, bias=bias), rate, k_res1)
    h = rms_norm(x, p["mlp_norm"]["scale"], eps=config.layer_norm_epsilon)
    h = mlp(p["mlp"], h, activation=config.mlp_activation, gated=config.mlp_gated, dropout_rate=rate, rng=k_mlp)
    return sharding.constrain(x + dropout(h, rate, k_res2), _ACT_BTD)

  x = scan_layers(layer, x, enc["layers"], num_layers=config.num_encoder_layers, rng=rng_layers,
                  remat=config.remat)
  x = rms_norm(x, enc["final_norm"]["scale"], eps=config.layer_norm_epsilon)
  return dropout(x, rate, rng_final)


def decode(params: dict, config: T5Config, decoder_input_ids_BT: jax.Array, encoded_BSD: jax.Array,
           encoder_mask_BS: jax.Array | None = None, decoder_mask_BT: jax.Array | None = None, *,
           decoder_segment_ids_BT: jax.Array | None = None, encoder_segment_ids_BS: jax.Array | None = None,
           decoder_positions_BT: jax.Array | None = None, rng: jax.Array | None = None) -> jax.Array:
  """Final decoder hidden states (B, T, D) for teacher-forced `decoder_input_ids` (before the LM head)."""
  B, T = decoder_input_ids_BT.shape
  dtype = jnp.dtype(config.dtype)
  rate = config.dropout_rate
  rng_embed, rng_layers, rng_final = split_rng(rng, 3)
  slots = masks.slot_index(B, T)
  positions = slots if decoder_positions_BT is None else decoder_positions_BT
  self_mask = masks.combine(
      masks.causal_mask(slots, slots),
      None if decoder_mask_BT is None else masks.key_padding_mask(decoder_mask_BT),
      None if decoder_segment_ids_BT is None else masks.segment_mask(decoder_segment_ids_BT, decoder_segment_ids_BT))
  cross_mask = masks.combine(
      None if encoder_mask_BS is None else masks.key_padding_mask(encoder_mask_BS),
      None if decoder_segment_ids_BT is None else masks.segment_mask(decoder_segment_ids_BT, encoder_segment_ids_BS))
  dec = params["decoder"]
  shared_bias = None if config.relative_bias_per_layer else _relpos_bias(config, dec["relpos"], positions,
                                                                         positions, False)
  x = sharding.constrain(dropout(embed(params["embed"]["embedding"], decoder_input_ids_BT, dtype), rate,
                                 rng_embed), _ACT_BTD)
  encoded_BSD = encoded_BSD.astype(dtype)

  def layer(x, p, key):
    k_res1, k_res2, k_mlp, k_res3 = split_rng(key, 4)
    eps = config.layer_norm_epsilon
    bias = shared_bias if shared_bias is not None else _relpos_bias(config, p["relpos"], positions, positions,
                                                                     False)
    h = rms_norm(x, p["attn_norm"]["scale"], eps=eps)
    x = x + dropout(_attention(p["attn"], h, h, mask=self_mask, bias=bias), rate, k_res1)
    h = rms_norm(x, p["cross_norm"]["scale"], eps=eps)
    x = x + dropout(_attention(p["cross_attn"], h, encoded_BSD, mask=cross_mask, bias=None), rate, k_res2)
    h = rms_norm(x, p["mlp_norm"]["scale"], eps=eps)
    h = mlp(p["mlp"], h, activation=config.mlp_activation, gated=config.mlp_gated, dropout_rate=rate, rng=k_mlp)
    return sharding.constrain(x + dropout(h, rate, k_res3), _ACT_BTD)

  x = scan_layers(layer, x, dec["layers"], num_layers=config.num_decoder_layers, rng=rng_layers,
                  remat=config.remat)
  x = rms_norm(x, dec["final_norm"]["scale"], eps=config.layer_norm_epsilon)
  return dropout(x, rate, rng_final)


def lm_logits(params: dict, config: T5Config, hidden_BTD: jax.Array) -> jax.Array:
  """Vocabulary logits (B, T, V) from decoder hidden states."""
  if config.scale_decoder_outputs:
    hidden_BTD = hidden_BTD * (config.d_model ** -0.5)
  if config.tie_lm_head:
    logits = jnp.einsum("BTD,VD->BTV", hidden_BTD, params["embed"]["embedding"].astype(hidden_BTD.dtype))
  else:
    logits = hidden_BTD @ params["lm_head"]["kernel"].astype(hidden_BTD.dtype)
  return sharding.constrain(logits, ("act_batch", "act_length", "act_vocab"))


def shift_right(ids_BT: jax.Array, start_id: int, pad_id: int) -> jax.Array:
  """[start] + ids[:-1], with -100 (ignored labels) replaced by pad, as T5's `_shift_right`."""
  shifted = jnp.concatenate([jnp.full_like(ids_BT[:, :1], start_id), ids_BT[:, :-1]], axis=1)
  return jnp.where(shifted == -100, pad_id, shifted)


def forward(params: dict, config: T5Config, input_ids_BS: jax.Array, attention_mask_BS: jax.Array | None = None,
            decoder_input_ids_BT: jax.Array | None = None, decoder_attention_mask_BT: jax.Array | None = None,
            *, rng: jax.Array | None = None, encoder_segment_ids_BS: jax.Array | None = None,
            encoder_positions_BS: jax.Array | None = None, decoder_segment_ids_BT: jax.Array | None = None,
            decoder_positions_BT: jax.Array | None = None) -> jax.Array:
  """The task's output in float32.

  lm: (B, T, V) logits; encoder: (B, S, D) hidden states; token_cls: (B, S, labels); qa: (B, T, labels)
  (start/end logits on the last axis); seq_cls: (B, labels) read at each row's last EOS of `input_ids`.
  seq_cls and qa decode `shift_right(input_ids)` when no decoder ids are given, as transformers does.
  """
  rng_enc, rng_dec, rng_head = split_rng(rng, 3)
  encoded = encode(params, config, input_ids_BS, attention_mask_BS, segment_ids_BS=encoder_segment_ids_BS,
                   positions_BS=encoder_positions_BS, rng=rng_enc)
  if config.task == "encoder":
    return encoded.astype(jnp.float32)
  if config.task == "token_cls":
    return dense(dropout(encoded, config.classifier_dropout, rng_head), params["classifier"]).astype(jnp.float32)
  if decoder_input_ids_BT is None:
    decoder_input_ids_BT = shift_right(input_ids_BS, config.decoder_start_token_id, config.pad_token_id)
  hidden = decode(params, config, decoder_input_ids_BT, encoded, attention_mask_BS, decoder_attention_mask_BT,
                  decoder_segment_ids_BT=decoder_segment_ids_BT, encoder_segment_ids_BS=encoder_segment_ids_BS,
                  decoder_positions_BT=decoder_positions_BT, rng=rng_dec)
  if config.task == "lm":
    return lm_logits(params, config, hidden).astype(jnp.float32)
  if config.task == "qa":
    return dense(hidden, params["qa_head"]).astype(jnp.float32)
  # seq_cls: the decoder state at the last EOS of each input row.
  S = input_ids_BS.shape[1]
  last_eos_B = jnp.max(jnp.where(input_ids_BS == config.eos_token_id, jnp.arange(S), -1), axis=1)
  pooled_BD = jnp.take_along_axis(hidden, last_eos_B[:, None, None], axis=1)[:, 0]
  k1, k2 = split_rng(rng_head, 2)
  head = params["cls_head"]
  h = jnp.tanh(dense(dropout(pooled_BD, config.classifier_dropout, k1), head["dense"]))
  return dense(dropout(h, config.classifier_dropout, k2), head["out"]).astype(jnp.float32)


# -------------------------------------------------------------------------------- incremental decoding

def _layer(tree, i):
  """The i-th layer's params from a stacked tree (i may be traced)."""
  return jax.tree.map(lambda w: jax.lax.dynamic_index_in_dim(w, i, 0, keepdims=False), tree)


def init_decoder_cache(config: T5Config, batch: int, max_length: int) -> dict:
  """Self-attention cache of the decoder: k, v (L, B, max_length, N, H) in the compute dtype, zeros."""
  shape = (config.num_decoder_layers, batch, max_length, config.num_heads, config.head_dim)
  dtype = jnp.dtype(config.dtype)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def cross_attention_kv(params: dict, config: T5Config, encoded_BSD: jax.Array) -> dict:
  """Cross-attention keys and values of every decoder layer, computed once per batch: (L, B, S, N, H)."""
  cross = params["decoder"]["layers"]["cross_attn"]
  enc = encoded_BSD.astype(jnp.dtype(config.dtype))
  return {"k": jnp.einsum("BSD,LDNH->LBSNH", enc, cross["k"].astype(enc.dtype)),
          "v": jnp.einsum("BSD,LDNH->LBSNH", enc, cross["v"].astype(enc.dtype))}


def decoder_step(params: dict, config: T5Config, token_B: jax.Array, index: jax.Array, cache: dict,
                 cross_kv: dict, encoder_mask_BS: jax.Array | None) -> tuple[jax.Array, dict]:
  """One decoder position for every row: feeds `token_B` at slot `index` (scalar), returns the float32 logits
  (B, V) for the next token and the cache with that slot written (in place: `dynamic_update_slice`)."""
  S_max = cache["k"].shape[2]
  dtype = jnp.dtype(config.dtype)
  eps = config.layer_norm_epsilon
  dec = params["decoder"]
  q_pos = jnp.full((1, 1), index, jnp.int32)
  k_pos = masks.slot_index(1, S_max)
  self_mask = (k_pos <= index)[:, None, None, :]  # (1, 1, 1, S_max): written slots only
  cross_mask = None if encoder_mask_BS is None else masks.key_padding_mask(encoder_mask_BS)
  shared_bias = None if config.relative_bias_per_layer else _relpos_bias(config, dec["relpos"], q_pos, k_pos, False)
  x = embed(params["embed"]["embedding"], token_B[:, None], dtype)

  def layer(carry, i):
    x, cache_k, cache_v = carry
    p = _layer(dec["layers"], i)
    bias = shared_bias if shared_bias is not None else _relpos_bias(config, p["relpos"], q_pos, k_pos, False)
    h = rms_norm(x, p["attn_norm"]["scale"], eps=eps)
    q = project_heads(h, p["attn"]["q"])
    cache_k = jax.lax.dynamic_update_slice(cache_k, project_heads(h, p["attn"]["k"])[None], (i, 0, index, 0, 0))
    cache_v = jax.lax.dynamic_update_slice(cache_v, project_heads(h, p["attn"]["v"])[None], (i, 0, index, 0, 0))
    k, v = cache_k[i], cache_v[i]
    x = x + merge_heads(dot_product_attention(q, k, v, mask=self_mask, bias=bias), p["attn"]["o"])
    h = rms_norm(x, p["cross_norm"]["scale"], eps=eps)
    q = project_heads(h, p["cross_attn"]["q"])
    attn = dot_product_attention(q, cross_kv["k"][i], cross_kv["v"][i], mask=cross_mask)
    x = x + merge_heads(attn, p["cross_attn"]["o"])
    h = rms_norm(x, p["mlp_norm"]["scale"], eps=eps)
    x = x + mlp(p["mlp"], h, activation=config.mlp_activation, gated=config.mlp_gated)
    return (x, cache_k, cache_v), None

  (x, cache_k, cache_v), _ = jax.lax.scan(layer, (x, cache["k"], cache["v"]),
                                          jnp.arange(config.num_decoder_layers))
  x = rms_norm(x, dec["final_norm"]["scale"], eps=eps)
  return lm_logits(params, config, x)[:, 0].astype(jnp.float32), {"k": cache_k, "v": cache_v}
