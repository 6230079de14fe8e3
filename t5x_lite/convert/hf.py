"""transformers model directory <-> (config, params), streamed tensor by tensor.

Import never builds a torch model and never holds the checkpoint twice: each tensor is read from the
memory-mapped file, rearranged into its slot of the stacked leaf, and each finished leaf is handed to the
device (sharded when a mesh is given) before the next one is built.
"""

import dataclasses
import gc
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from t5x_lite import sharding
from t5x_lite.convert.families import layout_of
from t5x_lite.convert.layout import hf_shape, to_hf, to_ours
from t5x_lite.convert.safetensors_io import CheckpointReader, write_checkpoint
from t5x_lite.errors import ConversionError
from t5x_lite.models.family import Family
from t5x_lite.models.params import is_spec
from t5x_lite.models.registry import family_of_config, family_of_model_type


def read_json(path: str) -> dict:
  if not os.path.exists(path):
    raise ConversionError(f"{path}: file not found")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ConversionError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None


def _flat_specs(specs) -> dict[tuple[str, ...], object]:
  flat, _ = jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)
  return {tuple(k.key for k in path): spec for path, spec in flat}


def _expected_tensors(family: Family, config) -> dict[str, tuple]:
  """HF name -> (rule, layer index or None, expected HF shape, our per-layer shape)."""
  flat = _flat_specs(family.param_specs(config))
  out = {}
  covered = set()
  for rule in layout_of(family).rules(config):
    spec = flat[rule.ours]
    covered.add(rule.ours)
    per_layer = spec.shape[1:] if rule.stacked else spec.shape
    for i in range(spec.shape[0] if rule.stacked else 1):
      name = rule.hf.format(i=i) if rule.stacked else rule.hf
      out[name] = (rule, i if rule.stacked else None, hf_shape(rule.transform, per_layer), per_layer)
  assert covered == set(flat), f"layout does not cover params: {set(flat) ^ covered}"
  return out


def load_hf_config(model_dir: str, reader: CheckpointReader | None = None):
  """Our config for an HF directory (its config.json, plus the tensor names that decide tying)."""
  path = os.path.join(model_dir, "config.json")
  hf = read_json(path)
  family = family_of_model_type(hf.get("model_type"), path)
  reader = reader or CheckpointReader(model_dir)
  return family.config_from_hf(hf, reader.names(), source=path)


def load_hf_params(model_dir: str, config, *, mesh=None, progress: bool = True,
                   reader: CheckpointReader | None = None) -> dict:
  """Params pytree (param dtype of `config`) from the HF checkpoint in `model_dir`.

  Every name, shape and dtype is checked against the layout before any tensor is read, so a wrong checkpoint
  fails fast with the tensor named: `ConversionError` for missing, unexpected, mis-shaped and non-float tensors.
  """
  family = family_of_config(config)
  layout = layout_of(family)
  reader = reader or CheckpointReader(model_dir)
  present = reader.names()
  expected = {}
  for name, entry in _expected_tensors(family, config).items():
    # The name the file uses: the canonical one or an alias.
    expected[next((a for a in (name, *layout.aliases(name)) if a in present), name)] = entry
  missing = [n for n in expected if n not in present]
  if missing:
    _, _, shape, _ = expected[missing[0]]
    raise ConversionError(f"{model_dir}: tensor {missing[0]!r} is missing (expected shape {shape})"
                          + (f"; {len(missing) - 1} more missing" if len(missing) > 1 else ""))
  skip_prefixes = layout.ignored_prefixes(config)
  copies = {name: source for name, source in layout.copies(config).items() if name in present}
  unexpected = sorted(n for n in present - set(expected) - set(layout.ignored(config)) - set(copies)
                      if not n.startswith(skip_prefixes))
  if unexpected:
    name = unexpected[0]
    raise ConversionError(f"{reader.file_of[name]}: unexpected tensor {name!r} with shape {reader.shape(name)} "
                          f"for {config.model_type} task {config.task!r}"
                          + (f"; {len(unexpected) - 1} more unexpected" if len(unexpected) > 1 else ""))
  for name, (_, _, shape, _) in expected.items():
    found = reader.shape(name)
    if found != shape:
      raise ConversionError(f"{reader.file_of[name]}: tensor {name!r} has shape {found}, expected {shape}")
    # Integers would be cast to float silently; ml_dtypes' bfloat16 and float8 are not np.floating, hence names.
    if not reader.dtype(name).startswith(("float", "bfloat")):
      raise ConversionError(f"{reader.file_of[name]}: tensor {name!r} has dtype {reader.dtype(name)}, expected a "
                            "floating dtype (float32, bfloat16 or float16)")
  # Before any leaf is built: the two tensors compared here are less than the params held later.
  for name, source in copies.items():
    _check_copy(reader, name, source)

  dtype = jnp.dtype(config.param_dtype)
  flat_specs = _flat_specs(family.param_specs(config))
  by_leaf: dict[tuple, list[str]] = {}
  for name, (rule, _, _, _) in expected.items():
    by_leaf.setdefault(rule.ours, []).append(name)
  leaves = {}
  # A with: closed on an error too, so the error message starts on its own line.
  with tqdm(total=len(expected), desc=f"converting {os.path.basename(os.path.normpath(model_dir))}",
            unit="tensor", disable=not progress) as bar:
    for path, names in by_leaf.items():
      spec = flat_specs[path]
      host = _aligned_empty(spec.shape, dtype)
      for name in names:
        rule, layer, _, per_layer = expected[name]
        value = to_ours(rule.transform, reader.get(name), per_layer)
        if layer is None:
          host[...] = value
        else:
          host[layer] = value
        bar.update(1)
      target = None if mesh is None else sharding.named_sharding(mesh, spec.axes, spec.shape)
      # On CPU, device_put of an aligned buffer adopts it without a copy: the host array becomes the leaf.
      leaves[path] = jax.device_put(host, target)
      del host
      if mesh is not None and leaves[path].nbytes > 64 * 1024 ** 2:
        gc.collect()  # the host buffer is only released by the cycle collector; do not let big ones pile up
  return _unflatten(leaves)


def _check_copy(reader: CheckpointReader, name: str, source: str) -> None:
  """Raises ConversionError unless tensor `name` holds exactly the values of `source` (the one we load)."""
  where = f"{reader.file_of[name]}: tensor {name!r}"
  if reader.shape(name) != reader.shape(source):
    raise ConversionError(f"{where} has shape {reader.shape(name)}, expected {reader.shape(source)} as {source!r}")
  # float32 holds bfloat16 and float16 values exactly, so a copy stored in another dtype still compares equal.
  copy, ref = reader.get(name).astype(np.float32), reader.get(source).astype(np.float32)
  if not np.array_equal(copy, ref, equal_nan=True):
    diff = float(np.nanmax(np.abs(copy - ref)))
    raise ConversionError(f"{where} differs from {source!r} (max abs diff {diff:.4g}); transformers feeds it to "
                          f"that stack instead of {source!r}, but t5x_lite holds one embedding for both stacks, so "
                          "this checkpoint with untied input embeddings cannot be loaded")


def _aligned_empty(shape, dtype) -> np.ndarray:
  """np.empty with 64-byte alignment, which XLA:CPU needs to use the buffer in place."""
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  raw = np.empty(nbytes + 64, np.uint8)
  offset = (-raw.ctypes.data) % 64
  return raw[offset:offset + nbytes].view(dtype).reshape(shape)


def _unflatten(flat: dict[tuple[str, ...], object]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def _rules_and_leaves(params: dict, config):
  layout = layout_of(family_of_config(config))
  for rule in layout.rules(layout.export_config(config)):
    leaf = params
    for key in rule.ours:
      leaf = leaf[key]
    yield rule, leaf


def hf_tensor_entries(params: dict, config, dtype=None) -> list[tuple[str, tuple, np.dtype]]:
  """(HF name, shape, dtype) of every tensor an export writes, in layout order, without touching data."""
  dtype = jnp.dtype(dtype or config.param_dtype)
  out = []
  for rule, leaf in _rules_and_leaves(params, config):
    if rule.stacked:
      out += [(rule.hf.format(i=i), hf_shape(rule.transform, leaf.shape[1:]), dtype) for i in range(leaf.shape[0])]
    else:
      out.append((rule.hf, hf_shape(rule.transform, leaf.shape), dtype))
  return out


def hf_tensors(params: dict, config, dtype=None):
  """Yields the HF tensors (numpy) one at a time, in the order of `hf_tensor_entries`."""
  dtype = jnp.dtype(dtype or config.param_dtype)
  for rule, leaf in _rules_and_leaves(params, config):
    host = np.asarray(jax.device_get(leaf)).astype(dtype, copy=False)
    if rule.stacked:
      for i in range(host.shape[0]):
        yield to_hf(rule.transform, host[i])
    else:
      yield to_hf(rule.transform, host)
    del host


def save_hf(params: dict, config, out_dir: str, *, dtype=None, max_shard_bytes: int = 2 * 1024 ** 3,
            extra_files: dict[str, str | bytes] | None = None) -> None:
  """Writes `config.json` + `model.safetensors` (or shards + index) that transformers loads, streaming one
  tensor at a time."""
  family = family_of_config(config)
  exported = layout_of(family).export_config(config)
  hf_config = family.config_to_hf(exported)
  entries = hf_tensor_entries(params, config, dtype)
  _check_represented(family, exported, hf_config, {name for name, _, _ in entries})
  if dtype is not None:
    hf_config["dtype"] = str(jnp.dtype(dtype))
  files = {"config.json": json.dumps(hf_config, indent=2, sort_keys=True) + "\n", **(extra_files or {})}
  write_checkpoint(entries, hf_tensors(params, config, dtype), out_dir, max_shard_bytes=max_shard_bytes,
                   extra_files=files)


# How the model computes, not what: not part of what an export must carry.
_NOT_EXPORTED = ("dtype", "param_dtype", "remat", "hf_extra_json")


def _check_represented(family: Family, config, hf_config: dict, tensor_names: set[str]) -> None:
  """ConversionError when transformers would read `hf_config` (with these tensors) as another model than `config`:
  e.g. a Gemma 2 config whose sliding layers have their own RoPE theta, which Gemma 2's config.json cannot say."""
  back = family.config_from_hf(hf_config, tensor_names, source="the exported config.json").canonical()
  ours = config.canonical()
  lost = [f.name for f in dataclasses.fields(ours)
          if f.name not in _NOT_EXPORTED and getattr(back, f.name) != getattr(ours, f.name)]
  if lost:
    changes = "; ".join(f"{name}: {getattr(ours, name)!r} would load as {getattr(back, name)!r}" for name in lost)
    raise ConversionError(f"transformers' {hf_config.get('model_type')} config cannot hold this model ({changes}): "
                          "it cannot be exported")


# Files that travel with the weights so that the tokenizer, the image processor (t5x_lite.vision: transformers 5
# nests it in processor_config.json, older checkpoints have preprocessor_config.json) and the generation defaults
# load from either format.
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "chat_template.jinja", "chat_template.json")
TOKENIZER_FILES = ("spiece.model", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.json", "generation_config.json") + PROCESSOR_FILES


def tokenizer_files(model_dir: str | None) -> dict[str, bytes]:
  """The tokenizer and processor files present in `model_dir`, name -> bytes."""
  out = {}
  for name in TOKENIZER_FILES if model_dir else ():
    path = os.path.join(model_dir, name)
    if os.path.isfile(path):
      with open(path, "rb") as f:
        out[name] = f.read()
  return out
