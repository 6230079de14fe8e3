"""Multi-token attention with a written-out backward pass: what training runs on CPU and TPU.

    out = softmax(cap(scale * q k^T) + logit_bias) v          cap(x) = softcap * tanh(x / softcap), optional

The forward keeps only each row's max and log-sum (B, K, G*T) for the backward, which recomputes the probabilities
from q and k, as flash attention does. Autodiff of the plain formula instead stores the (B, N, T, S) probabilities
of every layer: inside `lax.scan` those land in a stacked buffer that XLA zero-fills and copies into per step
(400 MB for the t5-v1_1-small encoder at batch 8 x 512), and it transposes the (B, N, T, S) tensors to feed the gradient
matmuls (XLA:CPU transposes run at 2-5 GB/s). Here every matmul takes the (., T, S) tensors as they lie:

    dV^T = dO^T P         dP = dO V^T          dS = P * (dP - rowsum(dO * O))
    dQ = dS K             dK^T = Q^T dS        (heads of a GQA group share K, V: their rows stack on one axis)

so only (B, T, N, H)-sized operands are ever transposed. Masks arrive folded into `logit_bias` as the float32
minimum (see `additive_mask`), which is how transformers' eager attention applies them too.
"""

import functools

import jax
import jax.numpy as jnp

NEG_INF = jnp.finfo(jnp.float32).min


def additive_mask(mask, bias):
  """`bias` (broadcastable to (B, N, T, S), float) with masked-out places (mask False) set to the float32 minimum.

  Either may be None; returns None when both are. A fully masked row then averages uniformly (every logit is the
  minimum), instead of producing NaN.
  """
  if mask is None:
    return None if bias is None else bias.astype(jnp.float32)
  return jnp.where(mask, 0.0 if bias is None else bias.astype(jnp.float32), NEG_INF).astype(jnp.float32)


def attend(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, logit_bias: jax.Array | None, *,
           scale: float, softcap: float | None) -> jax.Array:
  """Attention output (B, T, N, H); `logit_bias` float32 broadcastable to (B, N, T, S) (mask folded in) or None.

  K key/value heads serve N = K * G query heads; query head n reads kv head n // G (transformers' `repeat_kv`).
  """
  if logit_bias is not None:
    logit_bias = logit_bias.astype(jnp.float32)
    logit_bias = logit_bias.reshape((1,) * (4 - logit_bias.ndim) + logit_bias.shape)
  return _attend(q_BTNH, k_BSKH, v_BSKH, logit_bias, float(scale), None if softcap is None else float(softcap))


def _to_rows(x_BTNH, K):
  """(B, T, N, H) -> (B, K, G*T, H): the query rows each kv head serves, head n = k * G + g."""
  B, T, N, H = x_BTNH.shape
  return x_BTNH.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4).reshape(B, K, N // K * T, H)


def _from_rows(x_BKMH, T):
  B, K, M, H = x_BKMH.shape
  return x_BKMH.reshape(B, K, M // T, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, K * (M // T), H)


def _bias_5d_shape(shape, K):
  """(b, n, t, s) with n in {1, N} -> (b, 1 or K, 1 or G, t, s): broadcasts against logits (B, K, G, T, S)."""
  b, n, t, s = shape
  return (b, 1, 1, t, s) if n == 1 else (b, K, n // K, t, s)


def _bias_5d(logit_bias, K):
  return logit_bias.reshape(_bias_5d_shape(logit_bias.shape, K))


def _logits(q_BKMH, k_BKSH, logit_bias, scale, softcap, T):
  """Capped, biased float32 logits (B, K, M, S), M = G*T, and the tanh the cap applied (for the backward)."""
  logits = jnp.einsum("BKMH,BKSH->BKMS", q_BKMH, k_BKSH, preferred_element_type=jnp.float32) * scale
  capped = None
  if softcap is not None:
    capped = jnp.tanh(logits / softcap)
    logits = capped * softcap
  if logit_bias is not None:
    B, K, M, S = logits.shape
    logits = (logits.reshape(B, K, M // T, T, S) + _bias_5d(logit_bias, K)).reshape(B, K, M, S)
  return logits, capped


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attend(q_BTNH, k_BSKH, v_BSKH, logit_bias, scale, softcap):
  return _attend_fwd(q_BTNH, k_BSKH, v_BSKH, logit_bias, scale, softcap)[0]


def _attend_fwd(q_BTNH, k_BSKH, v_BSKH, logit_bias, scale, softcap):
  T = q_BTNH.shape[1]
  K = k_BSKH.shape[2]
  logits, _ = _logits(_to_rows(q_BTNH, K), k_BSKH.transpose(0, 2, 1, 3), logit_bias, scale, softcap, T)
  # Normalised by division as jax.nn.softmax does (exp(x - lse) rounds through the log: ~1e-6 relative in the
  # forward); the backward recomputes from the kept max and log-sum.
  max_BKM = logits.max(axis=-1)
  unnormalised = jnp.exp(logits - max_BKM[..., None])
  total_BKM = unnormalised.sum(axis=-1)
  probs = (unnormalised / total_BKM[..., None]).astype(v_BSKH.dtype)
  # Kept apart, not as max + log(total): next to a masked row's max (the float32 minimum) log(total) rounds away.
  row_max_logsum = (max_BKM, jnp.log(total_BKM))
  out_BTNH = _from_rows(jnp.einsum("BKMS,BKSH->BKMH", probs, v_BSKH.transpose(0, 2, 1, 3)), T)
  return out_BTNH, (q_BTNH, k_BSKH, v_BSKH, logit_bias, out_BTNH, row_max_logsum)


def _attend_bwd(scale, softcap, residuals, dout_BTNH):
  q_BTNH, k_BSKH, v_BSKH, logit_bias, out_BTNH, (max_BKM, logsum_BKM) = residuals
  T = q_BTNH.shape[1]
  K = k_BSKH.shape[2]
  dtype = q_BTNH.dtype
  q_BKMH = _to_rows(q_BTNH, K)
  k_BKSH = k_BSKH.transpose(0, 2, 1, 3)
  v_BKSH = v_BSKH.transpose(0, 2, 1, 3)
  dout_BKMH = _to_rows(dout_BTNH.astype(dtype), K)
  logits, capped = _logits(q_BKMH, k_BKSH, logit_bias, scale, softcap, T)
  probs = jnp.exp((logits - max_BKM[..., None]) - logsum_BKM[..., None])
  # rowsum(P * dP) = rowsum(dO * O): one (B, T, N, H) product instead of a pass over (B, N, T, S).
  delta_BKM = _to_rows(dout_BTNH.astype(jnp.float32) * out_BTNH.astype(jnp.float32), K).sum(-1)
  dprobs = jnp.einsum("BKMH,BKSH->BKMS", dout_BKMH, v_BKSH, preferred_element_type=jnp.float32)
  dlogits = probs * (dprobs - delta_BKM[..., None])  # gradient of the capped, biased logits, float32
  if logit_bias is not None:
    # Masked places get no gradient, as if the mask selected (jnp.where) rather than added: it matters only in a
    # fully masked row, whose uniform average otherwise passes a gradient to q and k through rounding noise.
    B, _, M, S = dlogits.shape
    masked = _bias_5d(logit_bias, K) == NEG_INF
    dlogits = jnp.where(masked, 0.0, dlogits.reshape(B, K, M // T, T, S)).reshape(B, K, M, S)
  dv_BKHS = jnp.einsum("BKMH,BKMS->BKHS", dout_BKMH, probs.astype(dtype))
  draw = dlogits if softcap is None else dlogits * (1.0 - capped * capped)
  draw = (draw * scale).astype(dtype)
  dq_BKMH = jnp.einsum("BKMS,BKSH->BKMH", draw, k_BKSH)
  dk_BKHS = jnp.einsum("BKMH,BKMS->BKHS", q_BKMH, draw)
  dbias = None if logit_bias is None else _bias_grad(dlogits, logit_bias.shape, K, T)
  return (_from_rows(dq_BKMH, T).astype(q_BTNH.dtype), dk_BKHS.transpose(0, 3, 1, 2).astype(k_BSKH.dtype),
          dv_BKHS.transpose(0, 3, 1, 2).astype(v_BSKH.dtype), dbias)


def _bias_grad(dlogits_BKMS, shape, K, T):
  """The (B, K, G*T, S) logit gradient summed down to the bias' shape (b, n, t, s)."""
  B, _, M, S = dlogits_BKMS.shape
  g = dlogits_BKMS.reshape(B, K, M // T, T, S)
  target = _bias_5d_shape(shape, K)
  axes = tuple(i for i, (have, want) in enumerate(zip(g.shape, target)) if want == 1 and have != 1)
  return (g.sum(axes, keepdims=True) if axes else g).reshape(shape)


_attend.defvjp(_attend_fwd, _attend_bwd)
