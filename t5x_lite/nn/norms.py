"""RMS normalisation in the two conventions of the supported families, and LayerNorm (the SigLIP tower)."""

import jax
import jax.numpy as jnp


def rms_norm(x_BxD: jax.Array, scale_D: jax.Array, *, eps: float, zero_centered: bool = False,
             axis: int = -1) -> jax.Array:
  """Root-mean-square norm over the feature axis (the last one, or `axis` for feature-major activations such as
  the (D, B) of a decoding step), computed in float32 and returned in `x`'s dtype.

  T5 stores a plain scale (`y * scale`); the Gemma family stores a zero-centred one (`y * (1 + scale)`), and
  multiplies in float32 before casting back, which `zero_centered=True` reproduces.
  """
  xf = x_BxD.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=axis, keepdims=True) + eps)
  scale = scale_D.astype(jnp.float32)
  if axis not in (-1, x_BxD.ndim - 1):
    scale = jnp.expand_dims(scale, tuple(range(1, x_BxD.ndim - axis % x_BxD.ndim)))
  if zero_centered:
    scale = 1.0 + scale
  return (y * scale).astype(x_BxD.dtype)


def layer_norm(x_BxD: jax.Array, scale_D: jax.Array, bias_D: jax.Array, *, eps: float) -> jax.Array:
  """(x - mean) / sqrt(var + eps) * scale + bias over the last axis, computed in float32, returned in x's dtype."""
  xf = x_BxD.astype(jnp.float32)
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  y = (xf - mean) * jax.lax.rsqrt(jnp.var(xf, axis=-1, keepdims=True) + eps)
  return (y * scale_D.astype(jnp.float32) + bias_D.astype(jnp.float32)).astype(x_BxD.dtype)
