"""Adafactor as T5X applies it (t5x/adafactor.py with `standard_logical_factor_rules`), as an optax transformation.

What a parameter's second moment is factored over comes from its logical axes (the family's `param_specs`), not
from its shape: each axis is a ROW axis (the kernel's input features: `embed`), a COLUMN axis (its output features:
`heads`, `kv`, `mlp`, `vocab`), a BATCH axis (`layers`: each index its own parameter) or not factored (`norm`,
`relpos_buckets`). A stacked attention kernel (L, D, N, H) keeps row statistics (L, D, 1, 1) and column
statistics (L, 1, N, H), 4 x L x (D + N x H) bytes, where optax.adafactor, which factors the two largest axes only
when both hold >= 128 entries, kept all of (L, D, N, H) for N = H = 64 (t5-v1_1-xxl: 4.8 B of its 11 B
parameters). The BATCH axis is never averaged over: each layer of a stack has its own update-clipping RMS and its
own parameter-scale RMS, as T5X's scanned layers have.

The rules per parameter (T5X's `_parse_rule` and `set_param_axes`):
  * rank <= 2 without a BATCH axis: T5X's heuristic, whatever the axes say: factor the larger axis (COLUMN)
    against the other (ROW) when the smaller holds >= `min_dim_size_to_factor` entries.
  * otherwise the axes' roles; a parameter without both ROW and COLUMN axes is not factored (its BATCH axes
    stay), and one with ROW, COLUMN and an unfactored axis is an error, as in T5X. T5X factors such a parameter
    whatever its size; we factor it only when its ROW axes and its COLUMN axes each hold >= min_dim_size_to_factor
    entries (products), so that a tiny model's 32 x 8 kernels keep their full second moment as optax's did.

The state keeps every reduced axis as a size-1 axis (T5X drops them): a statistic then has its parameter's rank,
broadcasts against it without bookkeeping, and takes its parameter's sharding less the reduced axes
(`sharding.follow_params`) without guessing which of two equal-sized axes was reduced.

Update of a parameter p with gradient g at step t (count from 0), for each BATCH index separately:
  decay = 1 - (t - step_offset + 1) ** -decay_rate;  g2 = g^2 + epsilon1
  factored:   v_row <- decay v_row + (1 - decay) mean_COLUMN(g2);  v_col <- decay v_col + (1 - decay) mean_ROW(g2)
              y = g / sqrt(v_row / mean_ROW(v_row) * v_col)
  unfactored: v <- decay v + (1 - decay) g2;  y = g / sqrt(v)
  y /= max(1, rms(y) / clipping_threshold);  step = lr(t) * max(rms(p), epsilon2) * y   (rms over non-BATCH axes)
  momentum:   m <- momentum m + (1 - momentum) step;  step = m
  update = -step - weight_decay_rate * p  (T5X's decay is not scaled by the learning rate)
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

ROW, COLUMN, BATCH, NONE = "row", "column", "batch", "none"

# Logical axis -> its role in the factored second moment (T5X's standard_logical_factor_rules, under our names).
LOGICAL_FACTOR_RULES: dict[str, str] = {
    "vocab": COLUMN,
    "embed": ROW,
    "heads": COLUMN,
    "kv_heads": COLUMN,
    "kv": COLUMN,
    "mlp": COLUMN,
    "labels": COLUMN,
    "layers": BATCH,
    "relpos_buckets": NONE,
    "norm": NONE,
}


@dataclasses.dataclass(frozen=True)
class FactorRule:
  """How one parameter's statistics are kept: axis indices of each role (`rows` and `cols` empty: unfactored)."""
  batch: tuple[int, ...]
  rows: tuple[int, ...] = ()
  cols: tuple[int, ...] = ()

  @property
  def factored(self) -> bool:
    return bool(self.rows and self.cols)

  def averaging(self, ndim: int) -> tuple[int, ...]:
    """The axes the clipping and parameter-scale RMS average over: all but the BATCH ones."""
    return tuple(d for d in range(ndim) if d not in self.batch)


def factor_rule(name: str, shape: tuple[int, ...], axes: tuple[str | None, ...] | None, *, factored: bool = True,
                min_dim_size_to_factor: int = 128) -> FactorRule:
  """The FactorRule of parameter `name` with this shape and these logical axes (None: not known, allowed only for
  rank <= 2). ValueError naming the parameter for an axis with no rule, or a ROW + COLUMN + unfactored mix."""
  ndim = len(shape)
  if axes is None:
    if ndim > 2:
      raise ValueError(f"adafactor: parameter {name} {tuple(shape)} has rank {ndim} and no logical axes: build the "
                       "optimizer with the params' axes (param_axes=models.params.axes_tree(specs))")
    roles = (NONE,) * ndim
  else:
    if len(axes) != ndim:
      raise ValueError(f"adafactor: parameter {name} {tuple(shape)} has logical axes {axes} of another rank")
    unknown = [a for a in axes if a is not None and a not in LOGICAL_FACTOR_RULES]
    if unknown:
      raise ValueError(f"adafactor: parameter {name} has logical axis {unknown[0]!r}, which has no factoring rule "
                       f"(adafactor.LOGICAL_FACTOR_RULES knows {sorted(LOGICAL_FACTOR_RULES)})")
    roles = tuple(NONE if a is None else LOGICAL_FACTOR_RULES[a] for a in axes)
  batch = tuple(d for d, r in enumerate(roles) if r == BATCH)
  if ndim <= 2 and not batch:  # T5X's heuristic: matrices factor by size, whatever their axes
    if not factored or ndim < 2 or min(shape) < min_dim_size_to_factor:
      return FactorRule(batch=())
    col = 1 if shape[1] >= shape[0] else 0  # the larger axis (np.argsort's order on a tie: the later one)
    return FactorRule(batch=(), rows=(1 - col,), cols=(col,))
  rows = tuple(d for d, r in enumerate(roles) if r == ROW)
  cols = tuple(d for d, r in enumerate(roles) if r == COLUMN)
  if rows and cols and NONE in roles:
    raise ValueError(f"adafactor: parameter {name} {tuple(shape)} with axes {axes} mixes factored and unfactored "
                     "axes (T5X's 'incomplete adafactor spec')")
  if (not factored or not rows or not cols or math.prod(shape[d] for d in rows) < min_dim_size_to_factor
      or math.prod(shape[d] for d in cols) < min_dim_size_to_factor):
    return FactorRule(batch=batch)
  return FactorRule(batch=batch, rows=rows, cols=cols)


class AdafactorState(NamedTuple):
  """Per-parameter trees (like the params; a parameter's statistic has its rank, reduced axes of size 1):
  `v_row` / `v_col` the factored statistics (mean of g^2 over the COLUMN / ROW axes), `v` the full second moment
  of an unfactored parameter, `m` the momentum; an unused slot holds a zero of shape (1,) * rank."""
  count: jax.Array  # int32 (): updates applied so far
  v_row: Any
  v_col: Any
  v: Any
  m: Any


def _reduced(shape, axes) -> tuple[int, ...]:
  return tuple(1 if d in axes else n for d, n in enumerate(shape))


def _rms(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  return jnp.sqrt(jnp.mean(x * x, axis=axes, keepdims=True))


def adafactor(learning_rate: float | Callable, *, param_axes=None, decay_rate: float = 0.8, step_offset: int = 0,
              epsilon1: float = 1e-30, epsilon2: float = 1e-3, clipping_threshold: float | None = 1.0,
              multiply_by_parameter_scale: bool = True, factored: bool = True, min_dim_size_to_factor: int = 128,
              momentum: float | None = None, weight_decay_rate: float | None = None) -> optax.GradientTransformation:
  """T5X's Adafactor (module docstring) over params whose logical axes `param_axes` gives (a tree of axis tuples
  like the params, `models.params.axes_tree(specs)`); `learning_rate` a float or a schedule of the step count.
  Parameters are matched to their axes by path, so the transformation also runs on a masked part of the tree
  (optax.multi_transform)."""
  axes_by_path = {} if param_axes is None else {
      jax.tree_util.keystr(path): tuple(axes) for path, axes in
      jax.tree_util.tree_leaves_with_path(param_axes, is_leaf=lambda a: isinstance(a, tuple))}

  def rule_of(path, shape) -> FactorRule:
    key = jax.tree_util.keystr(path)
    name = "/".join(str(getattr(k, "key", k)) for k in path)  # encoder/layers/attn/q
    return factor_rule(name, tuple(shape), axes_by_path.get(key), factored=factored,
                       min_dim_size_to_factor=min_dim_size_to_factor)

  def init(params):
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    slots = []
    for path, p in paths_leaves:
      rule = rule_of(path, p.shape)
      placeholder = jnp.zeros((1,) * p.ndim, jnp.float32)
      if rule.factored:
        v_row, v_col, v = (jnp.zeros(_reduced(p.shape, rule.cols), jnp.float32),
                           jnp.zeros(_reduced(p.shape, rule.rows), jnp.float32), placeholder)
      else:
        v_row, v_col, v = placeholder, placeholder, jnp.zeros(p.shape, jnp.float32)
      m = jnp.zeros(p.shape, jnp.float32) if momentum is not None else placeholder
      slots.append((v_row, v_col, v, m))
    return AdafactorState(jnp.zeros((), jnp.int32), *_unflatten_slots(treedef, slots))

  def update(grads, state: AdafactorState, params=None):
    if params is None and (multiply_by_parameter_scale or weight_decay_rate):
      raise ValueError("adafactor: multiply_by_parameter_scale and weight_decay_rate need the params in update()")
    count = state.count
    t = (count - step_offset + 1).astype(jnp.float32)
    decay = 1.0 - t ** -decay_rate
    lr = learning_rate(count) if callable(learning_rate) else learning_rate
    # Flattened by the gradients' structure, which a masked tree (optax.multi_transform) shares with the rest.
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(grads)
    columns = [treedef.flatten_up_to(tree) for tree in
               (grads if params is None else params, state.v_row, state.v_col, state.v, state.m)]
    updates, slots = [], []
    for (path, g), p, v_row, v_col, v, m in zip(paths_leaves, *columns):
      rule = rule_of(path, g.shape)
      averaging = rule.averaging(g.ndim)
      g = g.astype(jnp.float32)
      g2 = g * g + epsilon1
      if rule.factored:
        v_row = decay * v_row + (1.0 - decay) * jnp.mean(g2, axis=rule.cols, keepdims=True)
        v_col = decay * v_col + (1.0 - decay) * jnp.mean(g2, axis=rule.rows, keepdims=True)
        row_mean = jnp.mean(v_row, axis=rule.rows, keepdims=True)  # per BATCH index
        y = g * jax.lax.rsqrt(v_row / row_mean) * jax.lax.rsqrt(v_col)
      else:
        v = decay * v + (1.0 - decay) * g2
        y = g * jax.lax.rsqrt(v)
      if clipping_threshold is not None:
        y = y / jnp.maximum(1.0, _rms(y, averaging) / clipping_threshold)
      step = lr * y
      p32 = p.astype(jnp.float32)
      if multiply_by_parameter_scale:
        step = step * jnp.maximum(_rms(p32, averaging), epsilon2)
      if momentum is not None:
        m = momentum * m + (1.0 - momentum) * step
        step = m
      u = -step - weight_decay_rate * p32 if weight_decay_rate else -step
      updates.append(u.astype(p.dtype))
      slots.append((v_row, v_col, v, m))
    return treedef.unflatten(updates), AdafactorState(count + 1, *_unflatten_slots(treedef, slots))

  return optax.GradientTransformation(init, update)



def _unflatten_slots(treedef, slots: list[tuple]) -> list:
  """[v_row tree, v_col tree, v tree, m tree] from one (v_row, v_col, v, m) tuple per leaf of `treedef`."""
  return [treedef.unflatten(list(column)) for column in zip(*slots)] if slots else [treedef.unflatten([])] * 4
