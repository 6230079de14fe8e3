"""The train step: loss over a packed batch, gradient accumulation, optimizer update, metrics.

Batch features (numpy or jax arrays, leading axis = examples), as `t5x_lite.data.packing` makes them:
  encoder-decoder: input_ids, encoder_segment_ids, encoder_positions (B, S);
                   decoder_input_ids, decoder_target_ids, decoder_segment_ids, decoder_positions,
                   decoder_loss_weights (B, T)
  decoder-only:    input_ids, target_ids, segment_ids, positions, loss_weights (B, L) (a `prefix_mask` may be
                   present; attention stays causal over the prefix, as Gemma's is)
Segment id 0 marks padding. Params stay in `config.param_dtype` (float32 master weights) while the forward
pass computes in `config.dtype`.
"""

import functools

import jax
import jax.numpy as jnp
import optax

from t5x_lite.models.registry import family_of_config
from t5x_lite.training.losses import cross_entropy


def loss_sums(params: dict, config, batch: dict, rng, *, label_smoothing: float, z_loss: float) -> dict:
  logits = family_of_config(config).batch_logits(params, config, batch, rng)
  targets, weights = ((batch["decoder_target_ids"], batch["decoder_loss_weights"]) if config.is_encoder_decoder
                      else (batch["target_ids"], batch["loss_weights"]))
  return cross_entropy(logits, targets, weights, label_smoothing=label_smoothing, z_loss=z_loss)


def make_train_step(config, optimizer: optax.GradientTransformation, schedule, *, label_smoothing: float = 0.0,
                    z_loss: float = 0.0, accumulation_steps: int = 1, frozen_labels=None):
  """train_step(state, batch, rng) -> (state, metrics); state = {"step", "params", "opt_state"}.

  With `accumulation_steps` = A the batch is split into A microbatches run one after another under
  `lax.scan`; their gradients of the summed loss add up and are divided by the total token weight, so the
  update equals the one-shot batch's exactly (up to float summation order). `frozen_labels` (a tree like the params
  of "frozen" / "trained", optimizers.frozen_labels): no gradient flows into the frozen params, so XLA drops their
  backward pass; the optimizer (optimizers.with_frozen) leaves them as they are.
  """
  sums = functools.partial(loss_sums, config=config, label_smoothing=label_smoothing, z_loss=z_loss)

  def micro_grads(params, micro, rng):
    def f(p):
      if frozen_labels is not None:
        p = jax.tree.map(lambda x, label: jax.lax.stop_gradient(x) if label == "frozen" else x, p, frozen_labels)
      out = sums(p, batch=micro, rng=rng)
      return out["loss"], out
    return jax.grad(f, has_aux=True)(params)

  def train_step(state, batch, rng):
    params = state["params"]
    if accumulation_steps == 1:
      grads, totals = micro_grads(params, batch, rng)
    else:
      micro = jax.tree.map(lambda x: x.reshape(accumulation_steps, x.shape[0] // accumulation_steps, *x.shape[1:]),
                           batch)
      zero_grads = jax.tree.map(jnp.zeros_like, params)
      zero_totals = {k: jnp.zeros((), jnp.float32) for k in ("loss", "z_loss", "correct", "weight_sum")}

      def body(carry, xs):
        g_acc, t_acc = carry
        mb, i = xs
        g, t = micro_grads(params, mb, None if rng is None else jax.random.fold_in(rng, i))
        return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, t_acc, t)), None

      (grads, totals), _ = jax.lax.scan(body, (zero_grads, zero_totals), (micro, jnp.arange(accumulation_steps)))
    denom = jnp.maximum(totals["weight_sum"], 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = optimizer.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    metrics = {"loss": totals["loss"] / denom, "z_loss": totals["z_loss"] / denom,
               "accuracy": totals["correct"] / denom, "tokens": totals["weight_sum"],
               "grad_norm": optax.tree.norm(grads), "learning_rate": schedule(state["step"]),
               # A loss can still be finite on the step whose update breaks the params: check them too.
               "params_finite": jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(new_params)]))}
    return {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}, metrics

  return train_step


def make_eval_step(config):
  """eval_step(params, batch) -> summed loss / correct / weight_sum (for averaging over many batches)."""
  def eval_step(params, batch):
    return loss_sums(params, config, batch, None, label_smoothing=0.0, z_loss=0.0)
  return eval_step
