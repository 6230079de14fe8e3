"""Mesh specs (`data:2,fsdp:2,tensor:2`, `dcn_data:2,fsdp:16,tensor:4`): their syntax and parsing, without JAX, so
that entry points check a spec and print its help before JAX starts. sharding.make_mesh builds the mesh."""

MESH_AXES = ("data", "fsdp", "tensor")
# A multi-slice axis: `dcn_data:2` puts a factor 2 of the data axis across slices (the data-centre network, DCN),
# the rest of it within each slice (its interconnect, ICI). The mesh keeps the three axes above.
DCN_PREFIX = "dcn_"

MESH_SPEC_HELP = (
    "A mesh spec is AXIS:SIZE,... with AXIS in data (the batch), fsdp (the batch and the weights' embed dimension), "
    "tensor (heads, MLP and vocabulary); an axis left out has size 1 and the sizes multiply to the device count. "
    "Multi-slice (TPU slices or GPU hosts joined by the data-centre network): dcn_data / dcn_fsdp / dcn_tensor give "
    "the factor of that axis across slices (on CPU and GPU: across processes), e.g. dcn_data:2,fsdp:16,tensor:4 "
    "is data 2 (one per slice) x fsdp 16 x tensor 4 within each 64-device slice. Devices are placed by JAX's "
    "topology-aware mesh_utils, so neighbours on an axis are neighbours on the interconnect.")


def parse_hybrid_spec(spec: str) -> tuple[dict[str, int], dict[str, int]]:
  """'dcn_data:2,fsdp:2,tensor:2' -> (within a slice {'data': 1, 'fsdp': 2, 'tensor': 2}, across slices
  {'data': 2, 'fsdp': 1, 'tensor': 1}); axes left out have size 1. See MESH_SPEC_HELP."""
  ici, dcn = {axis: 1 for axis in MESH_AXES}, {axis: 1 for axis in MESH_AXES}
  seen = set()
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, sep, size = (x.strip() for x in part.partition(":"))
    axis = name.removeprefix(DCN_PREFIX)
    if not sep or axis not in MESH_AXES or not size.isdigit() or int(size) < 1 or name in seen:
      raise ValueError(f"bad mesh spec {spec!r}: each part must be AXIS:SIZE with AXIS in {MESH_AXES} (or "
                       f"{DCN_PREFIX}AXIS across slices), each once, and SIZE a positive integer (got {part!r})")
    seen.add(name)
    (dcn if name.startswith(DCN_PREFIX) else ici)[axis] = int(size)
  return ici, dcn


def parse_mesh_spec(spec: str) -> dict[str, int]:
  """'data:2,fsdp:2,tensor:2' -> {'data': 2, 'fsdp': 2, 'tensor': 2}: each mesh axis's size, its DCN factor
  included ('dcn_data:2,data:2' -> data 4); axes left out have size 1."""
  ici, dcn = parse_hybrid_spec(spec)
  return {axis: ici[axis] * dcn[axis] for axis in MESH_AXES}
