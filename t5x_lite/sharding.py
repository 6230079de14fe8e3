"""The one place where logical axis names meet mesh axes.

Every parameter and the main activations carry logical axis names (`embed`, `heads`, `mlp`, ...);
`LOGICAL_AXIS_RULES` maps each to mesh axes (`data`, `fsdp`, `tensor`). No mesh axis name appears in any
other module but mesh_spec.py, which reads the specs. A dimension that a mesh axis does not divide is replicated
instead of failing.
"""

import math
from collections.abc import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from t5x_lite import mesh_spec

# The spec's names, read from here too (inspect.py, tests).
MESH_AXES, parse_mesh_spec, parse_hybrid_spec = (mesh_spec.MESH_AXES, mesh_spec.parse_mesh_spec,
                                                 mesh_spec.parse_hybrid_spec)

# Logical axis -> mesh axes, in priority order. Parameters use the plain names; activations the `act_` ones.
LOGICAL_AXIS_RULES: dict[str, tuple[str, ...]] = {
    # parameters
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "kv": (),
    "mlp": ("tensor",),
    "layers": (),
    "relpos_buckets": (),
    "labels": (),
    "norm": (),
    # activations
    "act_batch": ("data", "fsdp"),
    "act_length": (),
    "act_embed": (),
    "act_heads": ("tensor",),
    "act_kv": (),
    "act_mlp": ("tensor",),
    "act_vocab": ("tensor",),
}


def make_mesh(spec: str | dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A Mesh with axes (data, fsdp, tensor) from a spec like 'data:2,tensor:4' over `devices` (all by default).

  Devices are arranged by `jax.experimental.mesh_utils` (TPU: along the physical torus; GPU: by global id), not in
  list order. A spec with DCN axes (MESH_SPEC_HELP) is a hybrid mesh: slices (devices' `slice_index`; processes
  where devices all say one slice, as on CPU and GPU) along the DCN factors, the spec's other factors within each.
  (mesh_spec.MESH_SPEC_HELP: the syntax.)
  """
  from jax.experimental import mesh_utils  # pylint: disable=import-outside-toplevel
  if isinstance(spec, str):
    ici, dcn = parse_hybrid_spec(spec)
  else:
    ici, dcn = {a: spec.get(a, 1) for a in MESH_AXES}, {a: 1 for a in MESH_AXES}
  devices = list(jax.devices() if devices is None else devices)
  sizes = {a: ici[a] * dcn[a] for a in MESH_AXES}
  want = math.prod(sizes.values())
  if want != len(devices):
    raise ValueError(f"mesh {sizes} needs {want} devices but {len(devices)} are available")
  ici_shape, dcn_shape = [ici[a] for a in MESH_AXES], [dcn[a] for a in MESH_AXES]
  if math.prod(dcn_shape) == 1:
    # allow_split_physical_axes: a mesh axis may span part of a physical one (e.g. tensor:2 on a 4x4 slice) rather
    # than the spec being refused; the helper still keeps each axis on neighbouring chips.
    grid = mesh_utils.create_device_mesh(ici_shape, devices, allow_split_physical_axes=True)
  else:
    # TPU multi-slice devices tell their slice; CPU and GPU devices say slice 0 (or nothing): their processes are
    # the units joined by the slower network.
    by_slice = len({getattr(d, "slice_index", None) for d in devices}) > 1
    granule = "slice_index" if by_slice else "process_index"
    granules = len({getattr(d, granule) for d in devices})
    if granules != math.prod(dcn_shape):
      unit = "slices" if by_slice else "processes (the slices of CPU and GPU runs)"
      raise ValueError(f"mesh spec {spec!r}: its DCN factors multiply to {math.prod(dcn_shape)} but the devices form "
                       f"{granules} {unit}")
    grid = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices, process_is_granule=not by_slice,
                                                allow_split_physical_axes=True)
  return Mesh(grid, MESH_AXES)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh_shape: dict[str, int]) -> PartitionSpec:
  """PartitionSpec for an array with these logical axes on a mesh of `mesh_shape` (axis -> size).

  A dimension whose size the chosen mesh axes do not divide is replicated; a mesh axis is used at most once.
  """
  used: set[str] = set()
  out = []
  for name, size in zip(axes, shape, strict=True):
    mesh_axes = tuple(a for a in LOGICAL_AXIS_RULES.get(name, ()) if a in mesh_shape and a not in used
                      and mesh_shape[a] > 1) if name else ()
    if mesh_axes and size % math.prod(mesh_shape[a] for a in mesh_axes) == 0:
      used.update(mesh_axes)
      out.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    else:
      out.append(None)
  return PartitionSpec(*out)


def named_sharding(mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(axes, shape, dict(mesh.shape)))


def tree_shardings(mesh: Mesh, axes_tree, shape_tree):
  """NamedShardings for a params pytree from its logical-axes tree (tuples are leaves) and shapes tree."""
  return jax.tree.map(lambda axes, x: named_sharding(mesh, axes, x.shape), axes_tree, shape_tree,
                      is_leaf=lambda a: isinstance(a, tuple))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation inside jit when a mesh is set (`jax.set_mesh`); else a no-op."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  spec = logical_to_spec(axes, x.shape, dict(mesh.shape))
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def follow_params(tree, params) -> object:
  """Shardings for a tree of arrays kept per parameter (an optimizer state), from `params` (arrays or
  ShapeDtypeStructs carrying shardings): a leaf whose path ends with a parameter's path takes
    * that parameter's sharding when it has its shape (Adam's moments, Adafactor's unfactored second moment);
    * when it has the parameter's rank with some dimensions reduced to 1 (training/adafactor.py's factored row /
      column statistics, e.g. (L, D, 1, 1) and (L, 1, N, H) of an (L, D, N, H) kernel): that sharding on the
      dimensions kept, and the mesh axes of the reduced dimensions moved onto a kept dimension they divide (an
      unsharded one first), so that a statistic is spread over as many devices as its parameter instead of being
      replicated over the axes its reduction freed (a (24, 1, 64, 64) column statistic of a kernel sharded
      (None, fsdp, None, None) on fsdp:64 is held 1/64 per device, not whole);
    * that sharding without one dimension when it is the parameter with that dimension removed (optax.adafactor's
      factored statistics);
  anything else (step counts) is replicated. Left to sharding propagation, XLA replicated the whole optimizer state:
  every device held all of it, and the train step, whose outputs came back sharded, compiled a second time at step 2.
  """
  by_path = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
  any_param = next(iter(by_path.values()))
  mesh = any_param.sharding.mesh
  replicated = NamedSharding(mesh, PartitionSpec())

  def one(path, leaf):
    key = jax.tree_util.keystr(path)
    # The longest parameter path the leaf's path ends with (a parameter path may end another one).
    owner = max(((name, p) for name, p in by_path.items() if key.endswith(name)), key=lambda item: len(item[0]),
                default=(None, None))[1]
    if owner is None:
      return replicated
    shape, owner_shape = tuple(leaf.shape), tuple(owner.shape)
    spec = tuple(owner.sharding.spec) + (None,) * (len(owner_shape) - len(owner.sharding.spec))
    if shape == owner_shape:
      return owner.sharding
    if len(shape) == len(owner_shape) and all(n in (1, m) for n, m in zip(shape, owner_shape)):
      return NamedSharding(mesh, _reduced_spec(spec, shape, owner_shape, dict(mesh.shape)))
    for dim in range(len(owner_shape)):
      if shape == owner_shape[:dim] + owner_shape[dim + 1:]:
        return NamedSharding(mesh, PartitionSpec(*(spec[:dim] + spec[dim + 1:])))
    return replicated

  return jax.tree_util.tree_map_with_path(one, tree)


def _reduced_spec(spec: tuple, shape: tuple[int, ...], owner_shape: tuple[int, ...],
                  mesh_shape: dict[str, int]) -> PartitionSpec:
  """The spec of a statistic of shape `shape` (the parameter's `owner_shape`, some dimensions reduced to 1) from
  its parameter's `spec`: kept dimensions keep their mesh axes; each mesh axis of a reduced dimension joins the kept
  dimension it still divides, an unsharded one first, the largest first (else it is left unused)."""
  reduced = [d for d, (n, m) in enumerate(zip(shape, owner_shape)) if n == 1 and m != 1]
  axes_of = lambda entry: (entry,) if isinstance(entry, str) else tuple(entry or ())  # noqa: E731
  out = [() if d in reduced else axes_of(entry) for d, entry in enumerate(spec)]
  for axis in (a for d in reduced for a in axes_of(spec[d])):
    fits = [d for d in range(len(shape)) if d not in reduced and shape[d] > 1
            and shape[d] % (math.prod(mesh_shape[a] for a in out[d]) * mesh_shape[axis]) == 0]
    if fits:
      d = max(fits, key=lambda d: (not out[d], shape[d]))
      out[d] += (axis,)
  return PartitionSpec(*(None if not axes else axes[0] if len(axes) == 1 else axes for axes in out))
