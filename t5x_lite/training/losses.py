"""Token cross-entropy as T5X computes it: optional label smoothing and z-loss, per-token weights."""

import jax
import jax.numpy as jnp

from t5x_lite.nn.argmax import argmax


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array, *,
                  label_smoothing: float = 0.0, z_loss: float = 0.0) -> dict:
  """Sums over weighted tokens (divide by `weight_sum` for the mean).

  Label smoothing puts 1 - s on the target and s / (V - 1) elsewhere, minus the entropy of that
  distribution so a perfect prediction scores 0 (T5X's convention). z-loss adds z * logsumexp(logits)^2,
  which keeps the softmax normaliser near 1 (bfloat16 stability).
  Returns {"loss", "z_loss", "correct", "weight_sum"} as float32 scalars.
  """
  logits = logits_BTV.astype(jnp.float32)
  V = logits.shape[-1]
  log_z = jax.nn.logsumexp(logits, axis=-1)
  log_p = logits - log_z[..., None]
  target_log_p = jnp.take_along_axis(log_p, targets_BT[..., None], axis=-1)[..., 0]
  if label_smoothing:
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (V - 1)
    normalizer = -(confidence * jnp.log(confidence) + (V - 1) * low * jnp.log(low + 1e-20))
    token_loss = -(confidence * target_log_p + low * (jnp.sum(log_p, axis=-1) - target_log_p)) - normalizer
  else:
    token_loss = -target_log_p
  token_z = z_loss * jnp.square(log_z)
  w = weights_BT.astype(jnp.float32)
  return {"loss": jnp.sum((token_loss + token_z) * w), "z_loss": jnp.sum(token_z * w),
          "correct": jnp.sum((argmax(logits, axis=-1) == targets_BT) * w), "weight_sum": jnp.sum(w)}
