"""Multi-token attention with a written-out backward pass: what training runs on CPU and TPU.

    out = softmax(where(mask, cap(scale * q k^T) + bias, min)) v          cap(x) = softcap * tanh(x / softcap)

The forward keeps only each row's max and log-sum (B, K, G*T) for the backward, which recomputes the probabilities
from q and k, as flash attention does. Autodiff of the plain formula instead stores the (B, N, T, S) probabilities
of every layer: inside `lax.scan` those land in a stacked buffer that XLA zero-fills and copies into per step
(400 MB for the t5-v1_1-small encoder at batch 8 x 512), and it transposes the (B, N, T, S) tensors to feed the gradient
matmuls (XLA:CPU transposes run at 2-5 GB/s). Here every matmul takes the (., T, S) tensors as they lie:

    dV^T = dO^T P         dP = dO V^T          dS = P * (dP - rowsum(dO * O))
    dQ = dS K             dK^T = Q^T dS        (heads of a GQA group share K, V: their rows stack on one axis)

so only (B, T, N, H)-sized operands are ever transposed.

The mask and the bias stay apart, each in its own broadcast shape (a T5 encoder's are (B, 1, T, S) bool and
(1, N, T, S) float), and meet only inside the fusions around the logits matmul. Folding them into one additive
(B, N, T, S) float tensor first made a 50 MB tensor (t5-v1_1-small, batch 8 x 512) that every layer read in the
forward and again in the backward. Masked logits become the float32 minimum (not -inf),
so a fully masked row averages uniformly instead of producing NaN, as transformers' eager attention does.
"""

import functools

import jax
import jax.numpy as jnp

NEG_INF = jnp.finfo(jnp.float32).min


def attend(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, *, mask: jax.Array | None = None,
           bias: jax.Array | None = None, scale: float, softcap: float | None) -> jax.Array:
  """Attention output (B, T, N, H). `mask` (True = attend) and `bias` (added to the logits) each broadcast to
  (B, N, T, S), or are None.

  K key/value heads serve N = K * G query heads; query head n reads kv head n // G (transformers' `repeat_kv`).
  """
  if mask is not None:
    mask = _as_4d(mask.astype(bool))
  if bias is not None:
    bias = _as_4d(bias.astype(jnp.float32))
  return _attend(q_BTNH, k_BSKH, v_BSKH, mask, bias, float(scale), None if softcap is None else float(softcap))


def _as_4d(x):
  return x.reshape((1,) * (4 - x.ndim) + x.shape)


def _to_rows(x_BTNH, K):
  """(B, T, N, H) -> (B, K, G*T, H): the query rows each kv head serves, head n = k * G + g."""
  B, T, N, H = x_BTNH.shape
  return x_BTNH.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4).reshape(B, K, N // K * T, H)


def _from_rows(x_BKMH, T):
  B, K, M, H = x_BKMH.shape
  return x_BKMH.reshape(B, K, M // T, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, K * (M // T), H)


def _5d_shape(shape, K):
  """(b, n, t, s) with n in {1, N} -> (b, 1 or K, 1 or G, t, s): broadcasts against logits (B, K, G, T, S)."""
  b, n, t, s = shape
  return (b, 1, 1, t, s) if n == 1 else (b, K, n // K, t, s)


def _5d(x, K):
  return x.reshape(_5d_shape(x.shape, K))


def _logits(q_BKMH, k_BKSH, mask, bias, scale, softcap, T):
  """Capped, biased, masked float32 logits (B, K, M, S), M = G*T, and the tanh the cap applied (for the backward)."""
  logits = jnp.einsum("BKMH,BKSH->BKMS", q_BKMH, k_BKSH, preferred_element_type=jnp.float32) * scale
  capped = None
  if softcap is not None:
    capped = jnp.tanh(logits / softcap)
    logits = capped * softcap
  if bias is None and mask is None:
    return logits, capped
  B, K, M, S = logits.shape
  logits = logits.reshape(B, K, M // T, T, S)
  if bias is not None:
    logits = logits + _5d(bias, K)
  if mask is not None:
    logits = jnp.where(_5d(mask, K), logits, NEG_INF)
  return logits.reshape(B, K, M, S), capped


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attend(q_BTNH, k_BSKH, v_BSKH, mask, bias, scale, softcap):
  return _attend_fwd(q_BTNH, k_BSKH, v_BSKH, mask, bias, scale, softcap)[0]


def _attend_fwd(q_BTNH, k_BSKH, v_BSKH, mask, bias, scale, softcap):
  T = q_BTNH.shape[1]
  K = k_BSKH.shape[2]
  logits, _ = _logits(_to_rows(q_BTNH, K), k_BSKH.transpose(0, 2, 1, 3), mask, bias, scale, softcap, T)
  # Normalised by division (exp(x - lse) rounds through the log: ~1e-6 relative), after the matmul: the division
  # then runs over (B, K, M, H) instead of a pass over the (B, K, M, S) probabilities. The backward recomputes
  # the probabilities from the kept max and log-sum.
  max_BKM = logits.max(axis=-1)
  unnormalised = jnp.exp(logits - max_BKM[..., None])
  total_BKM = unnormalised.sum(axis=-1)
  out_BKMH = jnp.einsum("BKMS,BKSH->BKMH", unnormalised.astype(v_BSKH.dtype), v_BSKH.transpose(0, 2, 1, 3),
                        preferred_element_type=jnp.float32) / total_BKM[..., None]
  # Kept apart, not as max + log(total): next to a masked row's max (the float32 minimum) log(total) rounds away.
  row_max_logsum = (max_BKM, jnp.log(total_BKM))
  out_BTNH = _from_rows(out_BKMH.astype(v_BSKH.dtype), T)
  return out_BTNH, (q_BTNH, k_BSKH, v_BSKH, mask, bias, out_BTNH, row_max_logsum)


def _attend_bwd(scale, softcap, residuals, dout_BTNH):
  q_BTNH, k_BSKH, v_BSKH, mask, bias, out_BTNH, (max_BKM, logsum_BKM) = residuals
  T = q_BTNH.shape[1]
  K = k_BSKH.shape[2]
  dtype = q_BTNH.dtype
  q_BKMH = _to_rows(q_BTNH, K)
  k_BKSH = k_BSKH.transpose(0, 2, 1, 3)
  v_BKSH = v_BSKH.transpose(0, 2, 1, 3)
  dout_BKMH = _to_rows(dout_BTNH.astype(dtype), K)
  logits, capped = _logits(q_BKMH, k_BKSH, mask, bias, scale, softcap, T)
  probs = jnp.exp((logits - max_BKM[..., None]) - logsum_BKM[..., None])
  # rowsum(P * dP) = rowsum(dO * O): one (B, T, N, H) product instead of a pass over (B, N, T, S).
  delta_BKM = _to_rows(dout_BTNH.astype(jnp.float32) * out_BTNH.astype(jnp.float32), K).sum(-1)
  dprobs = jnp.einsum("BKMH,BKSH->BKMS", dout_BKMH, v_BKSH, preferred_element_type=jnp.float32)
  dlogits = probs * (dprobs - delta_BKM[..., None])  # gradient of the capped, biased logits, float32
  if mask is not None:
    # Masked places get no gradient (the mask selects): it matters only in a fully masked row, whose uniform
    # average otherwise passes a gradient to q, k and the bias through rounding noise.
    B, _, M, S = dlogits.shape
    dlogits = jnp.where(_5d(mask, K), dlogits.reshape(B, K, M // T, T, S), 0.0).reshape(B, K, M, S)
  dv_BKHS = jnp.einsum("BKMH,BKMS->BKHS", dout_BKMH, probs.astype(dtype))
  draw = dlogits if softcap is None else dlogits * (1.0 - capped * capped)
  draw = (draw * scale).astype(dtype)
  dq_BKMH = jnp.einsum("BKMS,BKSH->BKMH", draw, k_BKSH)
  dk_BKHS = jnp.einsum("BKMH,BKMS->BKHS", q_BKMH, draw)
  dbias = None if bias is None else _bias_grad(dlogits, bias.shape, K, T)
  return (_from_rows(dq_BKMH, T).astype(q_BTNH.dtype), dk_BKHS.transpose(0, 3, 1, 2).astype(k_BSKH.dtype),
          dv_BKHS.transpose(0, 3, 1, 2).astype(v_BSKH.dtype), None, dbias)


def _bias_grad(dlogits_BKMS, shape, K, T):
  """The (B, K, G*T, S) logit gradient summed down to the bias' shape (b, n, t, s)."""
  B, _, M, S = dlogits_BKMS.shape
  g = dlogits_BKMS.reshape(B, K, M // T, T, S)
  target = _5d_shape(shape, K)
  axes = tuple(i for i, (have, want) in enumerate(zip(g.shape, target)) if want == 1 and have != 1)
  return (g.sum(axes, keepdims=True) if axes else g).reshape(shape)


_attend.defvjp(_attend_fwd, _attend_bwd)
