"""Declaring a params pytree once: shape, logical axes and initialiser per leaf.

A family writes `param_specs(config)` as a nested dict of `ParamSpec`; initialisation, abstract shapes
(`jax.eval_shape`-free param counting), the logical-axes tree for sharding and the converter's expected
shapes all derive from it, so they cannot disagree.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  shape: tuple[int, ...]
  axes: tuple[str | None, ...]
  init: str = "normal"  # normal | ones | zeros
  scale: float = 1.0  # stddev for "normal"

  def __post_init__(self):
    assert len(self.shape) == len(self.axes), (self.shape, self.axes)


def is_spec(x) -> bool:
  return isinstance(x, ParamSpec)


def init_params(specs, rng: jax.Array, dtype=jnp.float32):
  """Random params for a spec tree (normal(0, scale) / ones / zeros)."""
  leaves, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
  keys = jax.random.split(rng, len(leaves))
  out = []
  for spec, key in zip(leaves, keys):
    if spec.init == "ones":
      out.append(jnp.ones(spec.shape, dtype))
    elif spec.init == "zeros":
      out.append(jnp.zeros(spec.shape, dtype))
    else:
      out.append((jax.random.normal(key, spec.shape, jnp.float32) * spec.scale).astype(dtype))
  return jax.tree.unflatten(treedef, out)


def abstract_params(specs, dtype=jnp.float32):
  """jax.ShapeDtypeStruct tree: shapes without allocating."""
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), specs, is_leaf=is_spec)


def axes_tree(specs):
  """Tree of logical-axis tuples, parallel to the params tree."""
  return jax.tree.map(lambda s: s.axes, specs, is_leaf=is_spec)


def count_params(specs) -> int:
  return sum(math.prod(s.shape) for s in jax.tree.leaves(specs, is_leaf=is_spec))
