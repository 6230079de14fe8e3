"""T5Gemma 2: a Gemma 3 encoder and a Gemma 3 decoder whose attention reads its own keys and the encoder's in one
softmax ("merged" self- and cross-attention), as pure functions over a params pytree.

Params (shape letters: t5x_lite/shapes.py; stacks laid out as models/gemma.py lays a Gemma stack):
  embed/embedding (V, D), embed/eoi (D,)       one table for encoder, decoder and the tied head; the end-of-image
                                               token embeds as its own unscaled vector
  encoder/layers/... (L_enc), encoder/final_norm/scale (D,)
  decoder/layers/... (L_dec), decoder/final_norm/scale (D,)   no cross-attention weights: the decoder's k/v
                                               projections and k_norm also make the encoder's keys and values
  vision/... (models/siglip.py), projector/{norm/scale (E,), kernel (E, D)}   the image path: the tower's
                                               output, pooled, normed and projected, replaces the encoder's
                                               embeddings at the image tokens (not scaled by sqrt(D))
  score/{kernel (D, labels), bias (labels,)}   sequence / token classification
Behaviour kept from transformers (../shared/reference, section 6): encoder positions count slots (no padding
shift); its sliding layers see offsets [-((w+1)//2 - 1), +w//2]; the decoder's sliding layers a causal window of
w; encoder keys get k_norm but no RoPE and are never windowed; with no attention_mask nothing is masked.
"""

import jax
import jax.numpy as jnp
import numpy as np

from t5x_lite.config.t5gemma2 import T5Gemma2Config
from t5x_lite.decoding import kv_cache
from t5x_lite.models import gemma, gemma_decode, siglip
from t5x_lite.models.family import Decoder, SlotDecoder
from t5x_lite.models.layers import Attention, Stack, dense, shift_right, unstack_layers
from t5x_lite.models.params import ParamSpec, count_params
from t5x_lite.nn import masks, quant
from t5x_lite.nn.attention import project_heads
from t5x_lite.nn.norms import rms_norm

_INIT_STD = 0.02


def param_specs(config: T5Gemma2Config) -> dict:
  D, C = config.d_model, config.vision.hidden_size

  def stack(cfg):
    return {"layers": gemma.layer_specs(cfg), "final_norm": {"scale": ParamSpec((D,), ("norm",), init="zeros")}}

  specs = {"embed": gemma.embed_specs(config.decoder), "encoder": stack(config.encoder),
           "decoder": stack(config.decoder), "vision": siglip.param_specs(config.vision),
           "projector": {"norm": {"scale": ParamSpec((C,), ("norm",), init="zeros")},
                         "kernel": ParamSpec((C, D), ("mlp", "embed"), scale=_INIT_STD)}}
  if config.task in ("seq_cls", "token_cls"):
    specs["score"] = {"kernel": ParamSpec((D, config.num_labels), ("embed", "labels"), scale=_INIT_STD),
                      "bias": ParamSpec((config.num_labels,), ("labels",), init="zeros")}
  return specs


def _stack_view(params: dict, stack: str) -> dict:
  """A stack with the shared embedding, as models/gemma.py and gemma_decode.py read a Gemma model."""
  return {"embed": params["embed"], **params[stack]}


def image_tokens(params: dict, config: T5Gemma2Config, pixels_I3HW: jax.Array) -> jax.Array:
  """(I, M, D) text-side embeddings of images (I, c, height, width): the tower's patch grid average-pooled to
  sqrt(M) x sqrt(M) (row-major, as transformers pools), the zero-centred RMS norm, then the projection."""
  dtype = jnp.dtype(config.encoder.dtype)
  features_IQE = siglip.encode_images(params["vision"], config.vision, pixels_I3HW, dtype)
  I, _, E = features_IQE.shape
  side, pooled = config.vision.patches_per_side, config.tokens_per_side
  k = side // pooled
  x = features_IQE.astype(jnp.float32).reshape(I, pooled, k, pooled, k, E).mean(axis=(2, 4)).astype(dtype)
  x = rms_norm(x.reshape(I, pooled * pooled, E), params["projector"]["norm"]["scale"],
               eps=config.vision.layer_norm_eps, zero_centered=True)
  return x @ quant.weight(params["projector"]["kernel"], dtype)


def place_images(x_BSD: jax.Array, input_ids_BS: jax.Array, images_BIMD: jax.Array, image_token_id: int) -> jax.Array:
  """The embeddings with each row's image tokens replaced, in order, by that row's image embeddings: the k-th
  image token of row b takes token k % M of the row's image k // M (transformers scatters over the whole batch in
  the same row-major order; a per-row layout keeps a row's images with the row on a sharded batch)."""
  B, I, M, D = images_BIMD.shape
  is_image_BS = input_ids_BS == image_token_id
  rank_BS = jnp.clip(jnp.cumsum(is_image_BS, axis=1) - 1, 0, I * M - 1)
  chosen_BSD = jnp.take_along_axis(images_BIMD.reshape(B, I * M, D), rank_BS[..., None], axis=1)
  return jnp.where(is_image_BS[..., None], chosen_BSD.astype(x_BSD.dtype), x_BSD)


def encode(params: dict, config: T5Gemma2Config, input_ids_BS: jax.Array, attention_mask_BS: jax.Array | None = None,
           pixel_values_BI3HW: jax.Array | None = None, *, segment_ids_BS: jax.Array | None = None,
           positions_BS: jax.Array | None = None) -> jax.Array:
  """Final encoder states (B, S, D) in the compute dtype; bidirectional, windowed in sliding layers.

  `pixel_values_BI3HW` (B, I, c, height, width): each row's images in the order of its image tokens (rows with
  fewer pad with anything; their slots are never read). See `image_rows` for transformers' flat layout."""
  cfg = config.encoder
  B, S = input_ids_BS.shape
  slots = masks.slot_index(B, S)
  common = masks.combine(
      None if attention_mask_BS is None else masks.key_padding_mask(attention_mask_BS),
      None if segment_ids_BS is None else masks.segment_mask(segment_ids_BS, segment_ids_BS))
  full = masks.combine(masks.sliding_window_mask(slots, slots, left=S, right=S), common)
  w = cfg.sliding_window
  window = full if w is None else masks.combine(full, masks.sliding_window_mask(slots, slots, left=(w + 1) // 2 - 1,
                                                                                   right=w // 2))
  x = gemma.embed_tokens(params["embed"], cfg, input_ids_BS)
  if pixel_values_BI3HW is not None:
    B, I = pixel_values_BI3HW.shape[:2]
    images = image_tokens(params, config, pixel_values_BI3HW.reshape(B * I, *pixel_values_BI3HW.shape[2:]))
    x = place_images(x, input_ids_BS, images.reshape(B, I, *images.shape[1:]), config.image_token_index)
  x = gemma.run_stack(params["encoder"]["layers"], cfg, x, slots if positions_BS is None else positions_BS, full,
                      window)
  return rms_norm(x, params["encoder"]["final_norm"]["scale"], eps=cfg.rms_norm_eps, zero_centered=True)


def _encoder_keys(layer: dict, config: T5Gemma2Config, encoded_BSD: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One decoder layer's keys (k_norm, no RoPE) and values of the encoder states, each (B, S, K, H)."""
  a = layer["attn"]
  k = rms_norm(project_heads(encoded_BSD, a["k"]), a["k_norm"]["scale"], eps=config.decoder.rms_norm_eps,
               zero_centered=True)
  return k, project_heads(encoded_BSD, a["v"])


def decode(params: dict, config: T5Gemma2Config, decoder_input_ids_BT: jax.Array, encoded_BSD: jax.Array,
           encoder_mask_BS: jax.Array | None = None, decoder_mask_BT: jax.Array | None = None, *,
           decoder_segment_ids_BT: jax.Array | None = None, encoder_segment_ids_BS: jax.Array | None = None,
           decoder_positions_BT: jax.Array | None = None) -> jax.Array:
  """Final decoder states (B, T, D) in the compute dtype."""
  cfg = config.decoder
  B, T = decoder_input_ids_BT.shape
  S = encoded_BSD.shape[1]
  slots = masks.slot_index(B, T)
  full = masks.combine(
      masks.causal_mask(slots, slots),
      None if decoder_mask_BT is None else masks.key_padding_mask(decoder_mask_BT),
      None if decoder_segment_ids_BT is None else masks.segment_mask(decoder_segment_ids_BT, decoder_segment_ids_BT))
  w = cfg.sliding_window
  window = full if w is None else masks.combine(full, masks.sliding_window_mask(slots, slots, left=w - 1, right=0))
  cross = masks.combine(
      None if encoder_mask_BS is None else masks.key_padding_mask(encoder_mask_BS),
      None if decoder_segment_ids_BT is None or encoder_segment_ids_BS is None
      else masks.segment_mask(decoder_segment_ids_BT, encoder_segment_ids_BS))
  if cross is None:
    cross = jnp.ones((1, 1, 1, S), bool)
  encoded = encoded_BSD.astype(jnp.dtype(cfg.dtype))
  x = gemma.embed_tokens(params["embed"], cfg, decoder_input_ids_BT)
  x = gemma.run_stack(params["decoder"]["layers"], cfg, x, slots if decoder_positions_BT is None else
                      decoder_positions_BT, full, window, extra_keys=lambda p: _encoder_keys(p, config, encoded),
                      extra_mask=cross)
  return rms_norm(x, params["decoder"]["final_norm"]["scale"], eps=cfg.rms_norm_eps, zero_centered=True)


def forward(params: dict, config: T5Gemma2Config, input_ids_BS: jax.Array, attention_mask_BS: jax.Array | None = None,
            decoder_input_ids_BT: jax.Array | None = None, decoder_attention_mask_BT: jax.Array | None = None, *,
            rng: jax.Array | None = None,  # pylint: disable=unused-argument  (no dropout: the config refuses it)
            pixel_values_BI3HW: jax.Array | None = None, encoder_segment_ids_BS: jax.Array | None = None, encoder_positions_BS: jax.Array | None = None,
            decoder_segment_ids_BT: jax.Array | None = None, decoder_positions_BT: jax.Array | None = None
            ) -> jax.Array:
  """The task's output in float32: lm (B, T, V) decoder logits; token_cls (B, T, labels) at every decoder position;
  seq_cls (B, labels) at each row's last non-pad decoder input. The heads decode `shift_right(input_ids)` (start:
  bos) when no decoder ids are given, as transformers does."""
  encoded = encode(params, config, input_ids_BS, attention_mask_BS, pixel_values_BI3HW,
                   segment_ids_BS=encoder_segment_ids_BS, positions_BS=encoder_positions_BS)
  if decoder_input_ids_BT is None:
    decoder_input_ids_BT = shift_right(input_ids_BS, config.bos_token_id, config.pad_token_id)
  hidden = decode(params, config, decoder_input_ids_BT, encoded, attention_mask_BS, decoder_attention_mask_BT,
                  decoder_segment_ids_BT=decoder_segment_ids_BT, encoder_segment_ids_BS=encoder_segment_ids_BS,
                  decoder_positions_BT=decoder_positions_BT)
  if config.task == "lm":
    return gemma.lm_logits(params, config.decoder, hidden).astype(jnp.float32)
  logits = dense(hidden, params["score"])
  if config.task == "token_cls":
    return logits.astype(jnp.float32)
  T = decoder_input_ids_BT.shape[1]
  last_B = jnp.argmax(jnp.arange(T) * (decoder_input_ids_BT != config.pad_token_id), axis=-1)
  return jnp.take_along_axis(logits, last_B[:, None, None], axis=1)[:, 0].astype(jnp.float32)


def batch_logits(params: dict, config: T5Gemma2Config, batch: dict, rng: jax.Array | None) -> jax.Array:
  """Decoder logits (B, T, V) of a packed encoder-decoder training batch (RoPE positions restart per segment)."""
  return forward(params, config, batch["input_ids"], None, batch["decoder_input_ids"], None, rng=rng,
                 pixel_values_BI3HW=batch.get("pixel_values"), encoder_segment_ids_BS=batch["encoder_segment_ids"], encoder_positions_BS=batch["encoder_positions"],
                 decoder_segment_ids_BT=batch["decoder_segment_ids"], decoder_positions_BT=batch["decoder_positions"])


def forward_flops_per_token(config: T5Gemma2Config) -> dict[str, float]:
  """2 x the weights each token passes: an encoder token its stack, and every decoder layer's key and value
  projections of it; a decoder token its stack and the tied head. The vision tower is not counted: its cost is
  per image, not per token."""
  specs = param_specs(config)
  dec = config.decoder
  cross_kv = 2 * dec.num_layers * dec.d_model * dec.num_kv_heads * dec.head_dim
  return {"encoder_segment_ids": 2.0 * (count_params(specs["encoder"]) + cross_kv),
          "decoder_segment_ids": 2.0 * (count_params(specs["decoder"]) + config.vocab_size * config.d_model)}


def activation_stacks(config: T5Gemma2Config, lengths: dict[str, int]) -> tuple[Stack, ...]:
  """The encoder over S positions; the decoder over T, its merged attention reading T + S keys; with image slots,
  the vision tower over each slot's Q patches."""
  dec, vision = config.decoder, config.vision
  S, T = lengths["encoder_segment_ids"], lengths["decoder_segment_ids"]
  stacks = [gemma.activation_stacks(config.encoder, {"segment_ids": S})[0]._replace(path="encoder/layers"),
            Stack(dec.num_layers, T, dec.d_model, (Attention(T + S, dec.num_heads, dec.num_kv_heads, dec.head_dim),),
                  dec.d_ff, 2, path="decoder/layers")]
  if lengths.get("images"):
    Q, heads = vision.patches_per_side ** 2, vision.num_heads
    stacks.append(Stack(vision.num_layers, Q, vision.hidden_size,
                        (Attention(Q, heads, heads, vision.hidden_size // heads),), vision.intermediate_size, 1,
                        rows=lengths["images"], path="vision/layers"))
  return tuple(stacks)


def decoder(params: dict, config: T5Gemma2Config, input_ids_BS: jax.Array, attention_mask_BS: jax.Array | None,
            beams: int, max_new: int, pixel_values_BI3HW: jax.Array | None = None) -> Decoder:
  """The encoder runs once; every decoder layer's encoder keys and values are computed once and join its softmax
  beside the self-attention cache (ring buffers in sliding layers), over R = B x beams rows from the start token."""
  cfg = config.decoder
  B = input_ids_BS.shape[0]
  R = B * beams
  K = cfg.num_kv_heads
  view = _stack_view(params, "decoder")
  encoded = encode(params, config, input_ids_BS, attention_mask_BS, pixel_values_BI3HW).astype(jnp.dtype(cfg.dtype))
  layers = gemma_decode.decode_layer_params(view, cfg)
  keys, values = [], []
  for p in unstack_layers(params["decoder"]["layers"], cfg.num_layers):
    k, v = _encoder_keys(p, config, encoded)
    keys.append(kv_cache.repeat_rows(kv_cache.store(k.transpose(0, 2, 1, 3)), beams, B, K))
    values.append(kv_cache.repeat_rows(kv_cache.store(v.transpose(0, 2, 1, 3)), beams, B, K))
  mask = None if attention_mask_BS is None else masks.key_padding_mask(jnp.repeat(attention_mask_BS, beams, axis=0))
  cross = {"k": keys, "v": values, "mask": mask}

  def step(tokens_R, cache, t, vocab_major=False):
    return gemma_decode.decode_step(view, cfg, layers, tokens_R, t, cache, vocab_major=vocab_major, cross=cross)

  def reorder(cache, rows_R):
    # The encoder keys need no reordering: beams stay within their batch row, whose encoder rows are equal.
    return {name: [kv_cache.take_rows(x, rows_R, R, K) for x in xs] if name in ("k", "v")
            else jnp.take(xs, rows_R, axis=0) for name, xs in cache.items()}

  first = jnp.full((R,), config.decoder_start_token_id, jnp.int32)
  return Decoder(step, gemma_decode.empty_cache(cfg, R, kv_cache.Ring(max_new)), first, None, reorder, vocab_major=True)


def slot_decoder(config: T5Gemma2Config, slots: int, input_length: int, ring: kv_cache.Ring) -> SlotDecoder:
  """The decoder over R = `slots` requests of up to `input_length` encoder tokens and `ring.length` new tokens
  each: per row, every layer's encoder keys and values (R, K, input_length, H) and the encoder mask, written when
  its request is admitted, beside the decoder's own caches (gemma_decode's, rings indexed by the shared clock)."""
  cfg = config.decoder
  R, K, E = slots, cfg.num_kv_heads, input_length
  dtype = jnp.dtype(cfg.dtype)

  def prepare(params):
    view = _stack_view(params, "decoder")
    return {"params": params, "view": view, "layers": gemma_decode.decode_layer_params(view, cfg)}

  def init():
    empty = [kv_cache.zeros(R, K, E, cfg.head_dim, dtype) for _ in range(cfg.num_layers)]
    return {**gemma_decode.empty_cache(cfg, R, ring), "encoder_k": empty, "encoder_v": list(empty),
            "encoder_mask": jnp.ones((R, E), bool)}

  def encode_requests(weights, ids_AP, mask_AP, extra):
    """Per request: every layer's encoder keys and values (A, K, E, H) and the encoder mask (A, E), padded to E."""
    params = weights["params"]
    P = ids_AP.shape[1]
    encoded = encode(params, config, ids_AP, mask_AP, **extra).astype(dtype)
    keys, values = [], []
    for p in unstack_layers(params["decoder"]["layers"], cfg.num_layers):
      k, v = (jnp.pad(y.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, E - P), (0, 0)))
              for y in _encoder_keys(p, config, encoded))
      keys.append(k)
      values.append(v)
    return {"k": keys, "v": values, "mask": jnp.pad(mask_AP.astype(bool), ((0, 0), (0, E - P)))}, None

  def place(cache, rows_A, staged, g):  # pylint: disable=unused-argument
    return {**cache, "encoder_k": [kv_cache.put(o, rows_A, n, R, K) for o, n in zip(cache["encoder_k"], staged["k"])],
            "encoder_v": [kv_cache.put(o, rows_A, n, R, K) for o, n in zip(cache["encoder_v"], staged["v"])],
            "encoder_mask": cache["encoder_mask"].at[rows_A].set(staged["mask"], mode="drop"),
            "key_valid": cache["key_valid"].at[rows_A].set(False, mode="drop"),
            "next_position": cache["next_position"].at[rows_A].set(0, mode="drop")}

  def step(weights, tokens_R, cache, g, span):
    cross = {"k": cache["encoder_k"], "v": cache["encoder_v"], "mask": masks.key_padding_mask(cache["encoder_mask"])}
    own = {name: cache[name] for name in ("k", "v", "key_valid", "next_position")}
    logits, own = gemma_decode.decode_step(weights["view"], cfg, weights["layers"], tokens_R, g, own, cross=cross,
                                           span=span, vocab_major=True)
    return logits, {**cache, **own}

  return SlotDecoder(prepare, init, encode_requests, place, step, config.decoder_start_token_id, vocab_major=True)


def image_rows(config: T5Gemma2Config, input_ids_BS: np.ndarray, pixel_values_I3HW) -> np.ndarray:
  """transformers' flat `pixel_values` (all images of the batch, row after row) as (B, I, c, height, width): each
  row's images, I = the most any row has, zeros after a row's last. ValueError when a row's image tokens are not
  whole images or the images given are not the number the image tokens ask for."""
  pixels = np.asarray(pixel_values_I3HW, np.float32)
  want = (config.vision.num_channels, config.vision.image_size, config.vision.image_size)
  if pixels.ndim != 4 or pixels.shape[1:] != want:
    raise ValueError(f"pixel_values must be (images, {', '.join(map(str, want))}) as the processor gives them for "
                     f"this vision tower, got shape {pixels.shape}")
  config.tokens_per_side  # pylint: disable=pointless-statement  (raises for a tower that cannot pool to M tokens)
  M = config.mm_tokens_per_image
  tokens_B = (np.asarray(input_ids_BS) == config.image_token_index).sum(axis=1)
  for b, n in enumerate(tokens_B):
    if n % M:
      raise ValueError(f"row {b} of input_ids holds {n} image tokens (id {config.image_token_index}), not a whole "
                       f"number of images of {M} tokens each")
  images_B = tokens_B // M
  if images_B.sum() != len(pixels):
    raise ValueError(f"the image tokens of input_ids ask for {images_B.sum()} images (per row: {images_B.tolist()}), "
                     f"but pixel_values holds {len(pixels)}")
  out = np.zeros((len(images_B), max(1, images_B.max()), *want), np.float32)
  starts = np.concatenate([[0], np.cumsum(images_B)])
  for b, n in enumerate(images_B):
    out[b, :n] = pixels[starts[b]:starts[b] + n]
  return out
