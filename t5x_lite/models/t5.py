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
from t5x_lite.decoding import kv_cache
from t5x_lite.models.family import Decoder, SlotDecoder
from t5x_lite.models.layers import (Attention, Stack, dense, embed, heads_from_feature_major, out_in_matrix,
                                   scan_layers, shift_right, split_rng, unstack_layers)
from t5x_lite.models.params import ParamSpec, count_params
from t5x_lite.nn import masks, quant
from t5x_lite.nn.attention import cached_attention, dot_product_attention, merge_heads, project_heads
from t5x_lite.nn.dropout import dropout
from t5x_lite.nn.mlp import ACTIVATIONS, mlp
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
  S = input_ids_BS.shape[1]
  dtype = jnp.dtype(config.dtype)
  rate = config.dropout_rate
  rng_embed, rng_layers, rng_final = split_rng(rng, 3)
  positions = masks.slot_index(1, S) if positions_BS is None else positions_BS  # (1, S): a (1, N, S, S) bias
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
  T = decoder_input_ids_BT.shape[1]
  dtype = jnp.dtype(config.dtype)
  rate = config.dropout_rate
  rng_embed, rng_layers, rng_final = split_rng(rng, 3)
  slots = masks.slot_index(1, T)  # one row: masks and the bias built from it broadcast over the batch
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
    logits = jnp.einsum("BTD,VD->BTV", hidden_BTD, quant.weight(params["embed"]["embedding"], hidden_BTD.dtype))
  else:
    logits = hidden_BTD @ quant.weight(params["lm_head"]["kernel"], hidden_BTD.dtype)
  return sharding.constrain(logits, ("act_batch", "act_length", "act_vocab"))


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


def check_inputs(config: T5Config, input_ids_BS, decoder_input_ids_BT) -> None:
  """Sequence classification reads the decoder state at each row's last EOS of the inputs: a row without one, or
  decoder inputs of another length (the EOS position would fall outside them), is refused."""
  if config.task != "seq_cls":
    return
  no_eos = (~(input_ids_BS == config.eos_token_id).any(axis=1)).nonzero()[0]
  if no_eos.size:
    raise ValueError(f"sequence classification reads the last EOS (id {config.eos_token_id}) of each row; row "
                     f"{no_eos[0]} of input_ids has none")
  if decoder_input_ids_BT is not None and decoder_input_ids_BT.shape[1] != input_ids_BS.shape[1]:
    raise ValueError(f"sequence classification reads the decoder at the EOS positions of input_ids: "
                     f"decoder_input_ids must have its length {input_ids_BS.shape[1]} (or be left out: the shifted "
                     f"inputs then), got {decoder_input_ids_BT.shape[1]}")


def batch_logits(params: dict, config: T5Config, batch: dict, rng: jax.Array | None) -> jax.Array:
  """Decoder logits (B, T, V) of a packed encoder-decoder training batch.

  Positions are left out on purpose: T5's bias depends only on k - q, packing restarts positions at 0 and counts
  up within each contiguous segment (tests/test_data.py), and the segment mask hides every pair across segments,
  so slot offsets give the same logits. The bias is then (1, N, S, S) for the whole batch instead of a
  (B, N, S, S) tensor to build, read per layer and differentiate: 0.1-0.15 s of a 6 s t5-v1_1-small step.
  """
  return forward(params, config, batch["input_ids"], None, batch["decoder_input_ids"], None, rng=rng,
                 encoder_segment_ids_BS=batch["encoder_segment_ids"],
                 decoder_segment_ids_BT=batch["decoder_segment_ids"])


def forward_flops_per_token(config: T5Config) -> dict[str, float]:
  """2 x the weights an encoder token and a decoder token each pass through (the head's for decoder tokens; the
  embedding lookup is no matmul unless the head is tied to it)."""
  specs = param_specs(config)
  n_embed = count_params(specs["embed"])
  n_encoder = count_params(specs["encoder"])
  n_decoder = count_params(specs) - n_encoder - n_embed + (n_embed if config.task == "lm" and config.tie_lm_head
                                                           else 0)
  return {"encoder_segment_ids": 2.0 * n_encoder, "decoder_segment_ids": 2.0 * n_decoder}


def activation_stacks(config: T5Config, lengths: dict[str, int]) -> tuple[Stack, ...]:
  """The encoder over the inputs' S positions; the decoder over the targets' T, attending to T and to S."""
  N, H, D = config.num_heads, config.head_dim, config.d_model
  S = lengths["encoder_segment_ids"]
  mlp_shape = (config.d_ff, 2 if config.mlp_gated else 1)
  stacks = [Stack(config.num_encoder_layers, S, D, (Attention(S, N, N, H),), *mlp_shape, path="encoder/layers")]
  if config.is_encoder_decoder:
    T = lengths["decoder_segment_ids"]
    stacks.append(Stack(config.num_decoder_layers, T, D, (Attention(T, N, N, H), Attention(S, N, N, H)), *mlp_shape,
                        path="decoder/layers"))
  return tuple(stacks)


# -------------------------------------------------------------------------------- incremental decoding
# The decoding step is bound by reading weights, and XLA:CPU runs the skinny (batch x d_model) matmuls of one
# position best with the weight as a row-major (out, in) left operand and the activations feature-major (in,
# batch): at batch 8, 1.2-1.6x the (batch, in) @ (in, out) form. So `decoder_layer_params` slices the stacked
# layers once per generate call, outside the decoding loop, into that layout and the compute dtype, and the
# step runs its layers unrolled over them with per-layer caches (`decoding/kv_cache.py`): nothing is sliced,
# transposed or cast inside the loop. Measured on the t5-v1_1-small shape, 2-core EPYC, batch 1 / 8: the scanned
# step that indexed the stacked params (75 MB of weight-slice copies per step at batch 8, and XLA transposing
# the (N, H, D) output projections every step) took 9.4 / 17.9 ms, this one 6.1 / 13.2 ms. The price: the
# slicing and transposing, about 30 ms per generate call (XLA:CPU transposes run at 2-5 GB/s), memory for one
# more copy of the decoder layers during the call, and a step whose compile time grows with decoder depth
# (1.4 -> 3.5 s here). The forward pass and training keep the scan.

def decoder_layer_params(params: dict, config: T5Config) -> list[dict]:
  """The decoder's per-layer weights for `decoder_step`, (out, in) in the compute dtype: qkv (3, N*H, D) (one
  matmul), o (D, N*H), cross_q (N*H, D), cross_o (D, N*H), wi (2, F, D) gated (wi_0; wi_1) or (F, D), wo (D, F);
  cross_k/cross_v as stored, for `cross_attention_kv`; norm scales; umT5's per-layer relpos tables."""
  dtype = jnp.dtype(config.dtype)

  def out_in(kernel, in_dims: int):
    return out_in_matrix(kernel, in_dims, dtype)

  layers = []
  for p in unstack_layers(params["decoder"]["layers"], config.num_decoder_layers):
    attn, cross, ff = p["attn"], p["cross_attn"], p["mlp"]
    layer = {"attn_norm": p["attn_norm"]["scale"], "cross_norm": p["cross_norm"]["scale"],
             "mlp_norm": p["mlp_norm"]["scale"],
             "qkv": quant.stack([out_in(attn[n], 1) for n in "qkv"]), "o": out_in(attn["o"], 2),
             "cross_q": out_in(cross["q"], 1), "cross_o": out_in(cross["o"], 2),
             "cross_k": cross["k"], "cross_v": cross["v"],
             "wi": (quant.stack([out_in(ff["wi_0"], 1), out_in(ff["wi_1"], 1)]) if config.mlp_gated
                    else out_in(ff["wi"], 1)),
             "wo": out_in(ff["wo"], 1)}
    if config.relative_bias_per_layer:
      layer["relpos"] = p["relpos"]
    layers.append(layer)
  return layers


def init_decoder_cache(config: T5Config, batch: int, max_length: int) -> dict:
  """Self-attention cache of the decoder: k, v, each a list of L zero arrays (B, N, max_length, H) in the compute
  dtype, stored as `kv_cache` lays them out."""
  shape = (batch, config.num_heads, max_length, config.head_dim)
  dtype = jnp.dtype(config.dtype)
  L = config.num_decoder_layers
  return {name: [kv_cache.zeros(*shape, dtype) for _ in range(L)] for name in ("k", "v")}


def cross_attention_kv(layers: list[dict], config: T5Config, encoded_BSD: jax.Array) -> dict:
  """Cross-attention keys and values of every decoder layer, computed once per batch: k, v, each a list of L
  arrays (B, N, S, H), stored as `kv_cache` lays them out."""
  enc = encoded_BSD.astype(jnp.dtype(config.dtype))

  def project(kernel_DNH):
    return kv_cache.store(jnp.einsum("BSD,DNH->BNSH", enc, quant.weight(kernel_DNH, enc.dtype)))

  return {"k": [project(p["cross_k"]) for p in layers], "v": [project(p["cross_v"]) for p in layers]}


def decoder_step(params: dict, config: T5Config, layers: list[dict], token_B: jax.Array, index: jax.Array,
                 cache: dict, cross_kv: dict, encoder_mask_BS: jax.Array | None,
                 self_valid_BS: jax.Array | None = None, span: int | None = None) -> tuple[jax.Array, dict]:
  """One decoder position for every row: feeds `token_B` at position `index` (scalar), returns the float32 logits
  (B, V) for the next token and the cache with that position written (in place: `dynamic_update_slice`).

  Each layer's self-attention cache is a ring (`kv_cache.Ring`): position i lives in slot i % S_max (static
  decoding never wraps), or a tuple of rings, one per attention span, of which the step reads the ring of `span`
  slots (in-flight batching). Keys are the slots written so far, or with `self_valid_BS` (B, S_max) the slots
  marked there (indexed i % S_max), per row (in-flight batching: a slot's request started at some earlier
  position). The relative bias reads each key's distance from `index`, the same for every row whenever its
  request started.

  `layers` is `decoder_layer_params(params, config)`; `params` gives the embedding, relpos table, final norm
  and head. Activations run feature-major, x (D, B), between the (out, in) weight matmuls.
  """
  B = token_B.shape[0]
  N, H = config.num_heads, config.head_dim
  span = cache["k"][0].shape[-2] if span is None else span
  dtype = jnp.dtype(config.dtype)
  eps = config.layer_norm_epsilon
  dec = params["decoder"]
  q_pos = jnp.full((1, 1), index, jnp.int32)
  clocks = kv_cache.window_clocks(index, span)  # the position each key read holds
  k_pos = clocks[None, :]
  if self_valid_BS is None:
    self_mask = (k_pos >= 0)[:, None, None, :]  # (1, 1, 1, span): positions written so far, this one included
  else:
    self_mask = masks.key_padding_mask(kv_cache.window_valid(self_valid_BS, clocks))
  cross_mask = None if encoder_mask_BS is None else masks.key_padding_mask(encoder_mask_BS)
  shared_bias = None if config.relative_bias_per_layer else _relpos_bias(config, dec["relpos"], q_pos, k_pos, False)
  act = ACTIVATIONS[config.mlp_activation]
  x_DB = embed(params["embed"]["embedding"], token_B, dtype).T

  def heads(y_OB):  # (N*H, B) -> (B, 1, N, H)
    return heads_from_feature_major(y_OB, N, H)

  def attend_out(w_DO, attn_B1NH):  # output projection back to (D, B)
    return quant.matmul(w_DO, attn_B1NH.reshape(B, N * H).T)

  new_k, new_v = [], []
  for i, p in enumerate(layers):
    bias = shared_bias if shared_bias is not None else _relpos_bias(config, p["relpos"], q_pos, k_pos, False)
    h = rms_norm(x_DB, p["attn_norm"], eps=eps, axis=0)
    q, k, v = (heads(y) for y in quant.matmul(p["qkv"], h))
    new_k.append(kv_cache.ring_write(cache["k"][i], k, index))
    new_v.append(kv_cache.ring_write(cache["v"][i], v, index))
    attn = cached_attention(q, kv_cache.view(kv_cache.ring_read(new_k[i], span), B, N),
                            kv_cache.view(kv_cache.ring_read(new_v[i], span), B, N), mask=self_mask, bias=bias)
    x_DB = x_DB + attend_out(p["o"], attn)
    h = rms_norm(x_DB, p["cross_norm"], eps=eps, axis=0)
    attn = cached_attention(heads(quant.matmul(p["cross_q"], h)), kv_cache.view(cross_kv["k"][i], B, N),
                            kv_cache.view(cross_kv["v"][i], B, N), mask=cross_mask)
    x_DB = x_DB + attend_out(p["cross_o"], attn)
    h = rms_norm(x_DB, p["mlp_norm"], eps=eps, axis=0)
    if config.mlp_gated:
      gate, up = quant.matmul(p["wi"], h)
      f = act(gate) * up
    else:
      f = act(quant.matmul(p["wi"], h))
    x_DB = x_DB + quant.matmul(p["wo"], f)
  x = rms_norm(x_DB.T[:, None], dec["final_norm"]["scale"], eps=eps)
  return lm_logits(params, config, x)[:, 0].astype(jnp.float32), {"k": new_k, "v": new_v}


def decoder(params: dict, config: T5Config, input_ids_BS: jax.Array, attention_mask_BS: jax.Array | None,
            beams: int, max_new: int) -> Decoder:
  """The encoder runs once; the decoder steps over R = B x beams rows from the start token, with the cross keys and
  values computed once and a self-attention cache of `max_new` slots."""
  B = input_ids_BS.shape[0]
  R = B * beams
  N = config.num_heads
  encoded = encode(params, config, input_ids_BS, attention_mask_BS)
  layers = decoder_layer_params(params, config)
  cross = jax.tree.map(lambda x: kv_cache.repeat_rows(x, beams, B, N), cross_attention_kv(layers, config, encoded))
  mask = None if attention_mask_BS is None else jnp.repeat(attention_mask_BS, beams, axis=0)

  def step(tokens_R, cache, t):
    return decoder_step(params, config, layers, tokens_R, t, cache, cross, mask)

  def reorder(cache, rows_R):
    return jax.tree.map(lambda x: kv_cache.take_rows(x, rows_R, R, N), cache)

  first = jnp.full((R,), config.decoder_start_token_id, jnp.int32)
  return Decoder(step, init_decoder_cache(config, R, max_new), first, None, reorder)


def slot_decoder(config: T5Config, slots: int, input_length: int, ring: kv_cache.Ring) -> SlotDecoder:
  """The decoder over R = `slots` requests of up to `input_length` input tokens and `ring.length` new tokens each:
  per row, cross keys/values (R, N, input_length, H) written when its request is admitted, the encoder mask, and
  the self-attention ring with `valid` (R, ring.length) marking its request's positions."""
  R, N, E, S = slots, config.num_heads, input_length, ring.length
  dtype = jnp.dtype(config.dtype)

  def prepare(params):
    return {"params": params, "layers": decoder_layer_params(params, config)}

  def init():
    cross = [kv_cache.zeros(R, N, E, config.head_dim, dtype) for _ in range(config.num_decoder_layers)]
    own = [kv_cache.ring_zeros(R, N, ring, config.head_dim, dtype) for _ in range(config.num_decoder_layers)]
    return {"k": own, "v": list(own), "cross_k": cross, "cross_v": list(cross),
            "encoder_mask": jnp.ones((R, E), bool), "valid": jnp.zeros((R, S), bool)}

  def encode_requests(weights, ids_AP, mask_AP, extra):
    """Per request: every layer's cross keys and values (A, N, E, H) and the encoder mask (A, E), padded to E."""
    A, P = ids_AP.shape
    cross = cross_attention_kv(weights["layers"], config, encode(weights["params"], config, ids_AP, mask_AP, **extra))

    def padded(y):
      return jnp.pad(kv_cache.view(y, A, N), ((0, 0), (0, 0), (0, E - P), (0, 0)))

    return {"k": [padded(y) for y in cross["k"]], "v": [padded(y) for y in cross["v"]],
            "mask": jnp.pad(mask_AP.astype(bool), ((0, 0), (0, E - P)))}, None

  def place(cache, rows_A, staged, g):  # pylint: disable=unused-argument
    return {**cache, "cross_k": [kv_cache.put(o, rows_A, n, R, N) for o, n in zip(cache["cross_k"], staged["k"])],
            "cross_v": [kv_cache.put(o, rows_A, n, R, N) for o, n in zip(cache["cross_v"], staged["v"])],
            "encoder_mask": cache["encoder_mask"].at[rows_A].set(staged["mask"], mode="drop"),
            "valid": cache["valid"].at[rows_A].set(False, mode="drop")}

  def step(weights, tokens_R, cache, g, span):
    valid = cache["valid"].at[:, jnp.mod(g, S)].set(True)
    logits, kv = decoder_step(weights["params"], config, weights["layers"], tokens_R, g,
                              {"k": cache["k"], "v": cache["v"]}, {"k": cache["cross_k"], "v": cache["cross_v"]},
                              cache["encoder_mask"], valid, span)
    return logits, {**cache, **kv, "valid": valid}

  return SlotDecoder(prepare, init, encode_requests, place, step, config.decoder_start_token_id)
