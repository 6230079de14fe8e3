"""Optimizers and learning-rate schedules, configurable from gin. Built on optax."""

from collections.abc import Sequence

import gin
import jax
import jax.numpy as jnp
import optax

from t5x_lite.config.fields import checked_arguments
from t5x_lite.training import adafactor as adafactor_lib


@gin.configurable
@checked_arguments
def rsqrt_schedule(base_learning_rate: float = 1.0, warmup_steps: int = 10_000):
  """T5's default: base / sqrt(max(step, warmup)) (constant base/sqrt(warmup) during warmup)."""
  if warmup_steps < 0:
    raise ValueError(f"rsqrt_schedule.warmup_steps must be >= 0, got {warmup_steps}")

  def schedule(step):
    return base_learning_rate / jnp.sqrt(jnp.maximum(step, warmup_steps).astype(jnp.float32))
  return schedule


@gin.configurable
@checked_arguments
def cosine_schedule(peak_learning_rate: float = 1e-3, warmup_steps: int = 1000, total_steps: int = 100_000,
                    final_fraction: float = 0.1):
  """Linear warmup to the peak, cosine decay to `final_fraction` of it at `total_steps`."""
  return optax.warmup_cosine_decay_schedule(0.0, peak_learning_rate, warmup_steps, max(total_steps, warmup_steps + 1),
                                            peak_learning_rate * final_fraction)


@gin.configurable(denylist=["param_axes"])
@checked_arguments
def adafactor(schedule, *, param_axes=None, decay_rate: float = 0.8, step_offset: int = 0, epsilon1: float = 1e-30,
              epsilon2: float = 1e-3, clipping_threshold: float | None = 1.0, multiply_by_parameter_scale: bool = True,
              factored: bool = True, min_dim_size_to_factor: int = 128, momentum: float | None = None,
              weight_decay_rate: float | None = None):
  """T5X's Adafactor (training/adafactor.py) with its defaults: second moments factored over the logical axes
  `param_axes` (the params' `axes_tree`; each layer of a stack kept apart), decay 1 - t^-0.8, update clipping at
  1.0, updates scaled by each layer's parameter RMS, no momentum, no weight decay."""
  if clipping_threshold is not None and clipping_threshold <= 0:
    raise ValueError(f"adafactor.clipping_threshold must be > 0 or None, got {clipping_threshold}")
  if momentum is not None and not 0 <= momentum < 1:
    raise ValueError(f"adafactor.momentum must be in [0, 1) or None, got {momentum}")
  return adafactor_lib.adafactor(
      schedule, param_axes=param_axes, decay_rate=decay_rate, step_offset=step_offset, epsilon1=epsilon1,
      epsilon2=epsilon2, clipping_threshold=clipping_threshold, multiply_by_parameter_scale=multiply_by_parameter_scale,
      factored=factored, min_dim_size_to_factor=min_dim_size_to_factor, momentum=momentum,
      weight_decay_rate=weight_decay_rate)


@gin.configurable
@checked_arguments
def adamw(schedule, *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.01,
          max_grad_norm: float | None = 1.0):
  """AdamW with optional global-norm clipping (HF Trainer's defaults)."""
  opt = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  return opt if max_grad_norm is None else optax.chain(optax.clip_by_global_norm(max_grad_norm), opt)


@gin.configurable(denylist=["param_axes"])
@checked_arguments
def make_optimizer(name: str = "adafactor", schedule: str = "rsqrt", *, param_axes=None):
  """(optax optimizer, schedule fn) by name: adafactor | adamw, rsqrt | cosine. `param_axes`: the params' logical
  axes (`models.params.axes_tree(specs)`), which Adafactor factors its second moments over."""
  schedules = {"rsqrt": rsqrt_schedule, "cosine": cosine_schedule}
  optimizers = {"adafactor": adafactor, "adamw": adamw}
  if name not in optimizers or schedule not in schedules:
    raise ValueError(f"optimizer must be one of {list(optimizers)} and schedule one of {list(schedules)}, "
                     f"got {name!r}, {schedule!r}")
  sched = schedules[schedule]()
  return (adafactor(sched, param_axes=param_axes) if name == "adafactor" else optimizers[name](sched)), sched


def frozen_labels(params, frozen: Sequence[str]):
  """A tree like `params` holding "frozen" under each path of `frozen` ("vision", "encoder/layers": keys of the
  params tree joined by "/") and "trained" elsewhere. ValueError naming a path that holds no parameter."""
  paths = {tuple(p.split("/")) for p in frozen}
  leaf_paths = [tuple(str(getattr(k, "key", k)) for k in path)
                for path, _ in jax.tree_util.tree_leaves_with_path(params)]
  for p in sorted(paths):
    if not any(leaf[:len(p)] == p for leaf in leaf_paths):
      raise ValueError(f"train.frozen names {'/'.join(p)!r}, which holds no parameter of this model (its top-level "
                       f"parameter groups: {sorted(params)})")
  labels = ["frozen" if any(leaf[:len(p)] == p for p in paths) else "trained" for leaf in leaf_paths]
  return jax.tree.unflatten(jax.tree.structure(params), labels)


def with_frozen(optimizer: optax.GradientTransformation, labels) -> optax.GradientTransformation:
  """`optimizer` on the "trained" leaves of `labels`; the "frozen" ones keep their values and hold no optimizer
  state (optax.multi_transform with set_to_zero)."""
  return optax.multi_transform({"trained": optimizer, "frozen": optax.set_to_zero()}, labels)
