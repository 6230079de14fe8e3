"""Multi-head attention core shared by every family: MHA, GQA and MQA, bias, masks, soft-capping.

On GPU, multi-token attention in bfloat16/float16 without soft-capping goes to cuDNN's fused kernel through
`jax.nn.dot_product_attention`; other multi-token attention (CPU, TPU, soft-capped Gemma 2) goes to
`attention_core.attend`, whose written-out backward recomputes the probabilities instead of storing them;
decoding steps read the KV cache through the einsums below. `T5X_LITE_ATTENTION=xla` turns cuDNN off.
"""

import os

import jax
import jax.numpy as jnp

from t5x_lite import sharding
from t5x_lite.nn import masks, quant
from t5x_lite.nn.attention_core import attend

IMPLEMENTATION = os.environ.get("T5X_LITE_ATTENTION", "auto")  # auto | xla


def project_heads(x_BTD: jax.Array, kernel_DNH: jax.Array) -> jax.Array:
  """x @ kernel for a per-head kernel (D, N, H) -> (B, T, N, H)."""
  return jnp.einsum("BTD,DNH->BTNH", x_BTD, quant.weight(kernel_DNH, x_BTD.dtype))


def merge_heads(x_BTNH: jax.Array, kernel_NHD: jax.Array) -> jax.Array:
  """Output projection (N, H, D): (B, T, N, H) -> (B, T, D)."""
  return jnp.einsum("BTNH,NHD->BTD", x_BTNH, quant.weight(kernel_NHD, x_BTNH.dtype))


def dot_product_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, *,
                          mask: jax.Array | None = None, bias: jax.Array | None = None, scale: float = 1.0,
                          softcap: float | None = None) -> jax.Array:
  """softmax(scale * q k^T [softcapped] + bias, masked) v  -> (B, T, N, H).

  GQA/MQA: K key/value heads serve N = K*G query heads, query head n reading kv head n // G (transformers'
  `repeat_kv` order). `mask` broadcasts to (B, N, T, S) with True = attend; masked logits become the dtype's
  minimum (not -inf), so a fully masked row averages uniformly instead of producing NaN, like HF eager.
  `bias` broadcasts to (B, N, T, S). The softmax runs in float32.
  """
  if _use_cudnn(q_BTNH, softcap):
    return _cudnn_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask, bias=bias, scale=scale)
  out_BTNH = attend(q_BTNH, k_BSKH, v_BSKH, mask=mask, bias=bias, scale=scale, softcap=softcap)
  return sharding.constrain(out_BTNH, ("act_batch", "act_length", "act_heads", "act_kv"))


def cached_attention(q_BTNH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array, *, mask: jax.Array | None = None,
                     bias: jax.Array | None = None, scale: float = 1.0, softcap: float | None = None,
                     also: tuple | None = None) -> jax.Array:
  """`dot_product_attention` over a head-major KV cache (B, K, S, H) -> (B, T, N, H), for decoding steps.

  Caches are stored head-major because both attention matmuls batch over (B, K): the cache then feeds them as
  it lies, where the (B, S, K, H) layout made XLA transpose the whole cache (self and cross) at every step.
  `also=(k_BKSH, v_BKSH, mask)`: a second key set that joins the same softmax (T5Gemma 2's encoder keys beside its
  decoder cache); the two sets' logits are concatenated, not their caches, so neither cache is copied per step.
  """
  B, T, N, H = q_BTNH.shape
  K = k_BKSH.shape[1]
  q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
  logits_BKGTS = jnp.einsum("BTKGH,BKSH->BKGTS", q_BTKGH, k_BKSH, preferred_element_type=jnp.float32)
  if also is None:
    probs_BKGTS = _attention_probs(logits_BKGTS, mask, bias, scale, softcap).astype(v_BKSH.dtype)
    out_BKGTH = jnp.einsum("BKGTS,BKSH->BKGTH", probs_BKGTS, v_BKSH)
  else:
    if bias is not None:
      raise ValueError("a bias with a second key set is not supported")
    k2_BKSH, v2_BKSH, mask2 = also
    S = k_BKSH.shape[2]
    logits2_BKGTS = jnp.einsum("BTKGH,BKSH->BKGTS", q_BTKGH, k2_BKSH, preferred_element_type=jnp.float32)
    joined = jnp.concatenate([logits_BKGTS, logits2_BKGTS], axis=-1)
    probs_BKGTS = _attention_probs(joined, masks.join_keys(mask, mask2, sizes=(S, k2_BKSH.shape[2])), bias, scale,
                                   softcap).astype(v_BKSH.dtype)
    out_BKGTH = (jnp.einsum("BKGTS,BKSH->BKGTH", probs_BKGTS[..., :S], v_BKSH)
                 + jnp.einsum("BKGTS,BKSH->BKGTH", probs_BKGTS[..., S:], v2_BKSH))
  # Heads stay major in the output: asking the dot for (B, T, K, G, H) made XLA transpose the (N, H, D) output
  # projection weight at every step instead (2.4 ms of a 9 ms t5-v1_1-small step at batch 1).
  out_BTNH = out_BKGTH.reshape(B, N, H)[:, None] if T == 1 else out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)
  return sharding.constrain(out_BTNH, ("act_batch", "act_length", "act_heads", "act_kv"))


def _attention_probs(logits_BKGTS, mask, bias, scale, softcap):
  """Scaled, soft-capped, biased, masked float32 softmax over S of logits (B, K, G, T, S)."""
  B, K, G, T, S = logits_BKGTS.shape
  N = K * G
  logits_BKGTS = logits_BKGTS * scale
  if softcap is not None:
    logits_BKGTS = jnp.tanh(logits_BKGTS / softcap) * softcap
  if bias is not None:
    bias = jnp.broadcast_to(bias, (bias.shape[0], N, T, S)).reshape(bias.shape[0], K, G, T, S)
    logits_BKGTS = logits_BKGTS + bias.astype(jnp.float32)
  if mask is not None:
    mask_BKGTS = jnp.broadcast_to(mask, (mask.shape[0], mask.shape[1], T, S))
    if mask_BKGTS.shape[1] == 1:
      mask_BKGTS = mask_BKGTS[:, :, None]
    else:
      mask_BKGTS = mask_BKGTS.reshape(mask.shape[0], K, G, T, S)
    logits_BKGTS = jnp.where(mask_BKGTS, logits_BKGTS, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(logits_BKGTS, axis=-1)


def _use_cudnn(q_BTNH: jax.Array, softcap: float | None) -> bool:
  return (IMPLEMENTATION == "auto" and jax.default_backend() == "gpu" and softcap is None
          and q_BTNH.dtype in (jnp.bfloat16, jnp.float16) and q_BTNH.shape[1] > 1 and q_BTNH.shape[-1] <= 256)


def _cudnn_attention(q_BTNH, k_BSKH, v_BSKH, *, mask, bias, scale):
  """cuDNN flash attention; the mask joins the bias as a large negative number (not -inf, so a fully masked
  pad row averages instead of producing NaN, as on the einsum path)."""
  B, T, N, _ = q_BTNH.shape
  S = k_BSKH.shape[1]
  additive = None
  if bias is not None:
    additive = bias.astype(jnp.float32)
  if mask is not None:
    masked = jnp.where(mask, 0.0, -1e9)
    additive = masked if additive is None else additive + masked
  if additive is not None:
    additive = jnp.broadcast_to(additive, (B, N, T, S)).astype(q_BTNH.dtype)
  out = jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, bias=additive, scale=scale, implementation="cudnn")
  return sharding.constrain(out, ("act_batch", "act_length", "act_heads", "act_kv"))
