"""Reading and writing transformers safetensors checkpoints one tensor at a time.

Reading goes through `safetensors.safe_open` (memory-mapped), so a tensor is materialised only when asked
for; every failure is re-raised as `ConversionError` naming the file (and tensor).
"""

import json
import os
import shutil
import struct
from collections.abc import Iterable, Iterator

import numpy as np
from safetensors import SafetensorError, safe_open

from t5x_lite.convert.staging import move_into_place, temp_dir_beside
from t5x_lite.errors import ConversionError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointReader:
  """The tensors of an HF model directory (single `model.safetensors` or a sharded index)."""

  def __init__(self, model_dir: str):
    self.model_dir = model_dir
    self._handles: dict[str, object] = {}
    index_path = os.path.join(model_dir, INDEX_FILE)
    single_path = os.path.join(model_dir, SINGLE_FILE)
    if os.path.exists(index_path):
      try:
        with open(index_path) as f:
          weight_map = json.load(f)["weight_map"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConversionError(f"{index_path}: not a valid safetensors index ({e})") from None
      self.file_of = {name: os.path.join(model_dir, fname) for name, fname in weight_map.items()}
      for path in sorted(set(self.file_of.values())):
        if not os.path.exists(path):
          raise ConversionError(f"{index_path}: lists shard {os.path.basename(path)!r}, which is missing")
      # The index could disagree with its shards: trust the shards' own headers.
      listed = self.file_of
      self.file_of = {}
      for path in sorted(set(listed.values())):
        for name in self._open(path).keys():
          self.file_of[name] = path
      for name, path in listed.items():
        if name not in self.file_of:
          raise ConversionError(f"{path}: tensor {name!r} is listed in {INDEX_FILE} but not in the file")
    elif os.path.exists(single_path):
      self.file_of = {name: single_path for name in self._open(single_path).keys()}
    else:
      raise ConversionError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE} found")

  def _open(self, path: str):
    if path not in self._handles:
      try:
        self._handles[path] = safe_open(path, framework="np")
      except (SafetensorError, OSError, ValueError) as e:
        raise ConversionError(f"{path}: cannot read safetensors file (truncated or corrupt?): {e}") from None
    return self._handles[path]

  def names(self) -> set[str]:
    return set(self.file_of)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._open(self.file_of[name]).get_slice(name).get_shape())

  def dtype(self, name: str) -> str:
    """The stored dtype as numpy names it ("bfloat16", "int32"), or the header's own code if unknown."""
    code = self._open(self.file_of[name]).get_slice(name).get_dtype()
    return _NP_DTYPES.get(code, code)

  def get(self, name: str) -> np.ndarray:
    path = self.file_of[name]
    try:
      return self._open(path).get_tensor(name)
    except (SafetensorError, OSError, ValueError) as e:
      raise ConversionError(f"{path}: cannot read tensor {name!r} (truncated or corrupt file?): {e}") from None


_ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int32": "I32", "int64": "I64",
              "int8": "I8", "uint8": "U8", "bool": "BOOL", "float64": "F64", "int16": "I16", "uint16": "U16",
              "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}
_NP_DTYPES = {code: name for name, code in _ST_DTYPES.items()}


def _write_safetensors(path: str, entries: list[tuple[str, tuple, np.dtype]], arrays: Iterator[np.ndarray]):
  """Writes one safetensors file, tensor by tensor as `arrays` yields them (in `entries` order).

  Written here rather than with `safetensors.numpy.save_file`, which needs every tensor of the file in memory
  at once (a second copy of the model for a single-file export); the format is a little-endian u64 header
  length, a JSON header of dtypes, shapes and byte offsets, then the raw bytes.
  """
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for name, shape, dtype in entries:
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if np.dtype(dtype).name not in _ST_DTYPES:
      raise ValueError(f"{name}: dtype {np.dtype(dtype)} has no safetensors code")
    header[name] = {"dtype": _ST_DTYPES[np.dtype(dtype).name], "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  head = json.dumps(header, separators=(",", ":")).encode()
  head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned, as safetensors writes it
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(head)))
    f.write(head)
    for name, shape, dtype in entries:
      array = next(arrays)
      if tuple(array.shape) != tuple(shape) or array.dtype != np.dtype(dtype):
        raise ValueError(f"{name}: got {array.dtype}{array.shape}, planned {np.dtype(dtype)}{tuple(shape)}")
      # As raw bytes: numpy cannot export a buffer of ml_dtypes' types (bfloat16, float8), but a uint8 view of
      # the contiguous array is the same memory without a copy (reshape(-1) first, so 0-d arrays view too).
      f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)


def write_checkpoint(entries: list[tuple[str, tuple, np.dtype]], arrays: Iterable[np.ndarray], out_dir: str, *,
                     max_shard_bytes: int = 2 * 1024 ** 3, extra_files: dict[str, str | bytes] | None = None) -> None:
  """Writes `model.safetensors` (or shards plus an index when over `max_shard_bytes`).

  `entries` lists (name, shape, dtype) up front and `arrays` yields the tensors in that order, one at a time,
  each written as it arrives: no more than one tensor is held here. Everything goes into a temporary
  directory beside `out_dir` (`staging.temp_dir_beside`) and is moved into place at the end, so a failure
  leaves no half-written checkpoint. `extra_files` maps file names to contents, str or bytes (config.json,
  tokenizer files).
  Raises ConversionError naming `out_dir` when it cannot be written.
  """
  if max_shard_bytes <= 0:
    raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise ConversionError(f"{out_dir}: exists and is not a directory")
  tmp = temp_dir_beside(out_dir)
  try:
    shards: list[list] = [[]]
    size = total = 0
    for entry in entries:
      nbytes = int(np.prod(entry[1], dtype=np.int64)) * np.dtype(entry[2]).itemsize
      if shards[-1] and size + nbytes > max_shard_bytes:
        shards.append([])
        size = 0
      shards[-1].append(entry)
      size += nbytes
      total += nbytes
    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    arrays = iter(arrays)
    for fname, shard in zip(names, shards):
      _write_safetensors(os.path.join(tmp, fname), shard, arrays)
    if n > 1:
      index = {"metadata": {"total_size": total},
               "weight_map": {e[0]: fname for fname, shard in zip(names, shards) for e in sorted(shard)}}
      with open(os.path.join(tmp, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)
    for fname, content in (extra_files or {}).items():
      with open(os.path.join(tmp, fname), "wb") as f:
        f.write(content.encode() if isinstance(content, str) else content)
    # Into an existing directory: replace only our files, and drop weight files of an earlier export so
    # that no stale shard or index remains beside the new ones.
    for fname in os.listdir(out_dir) if os.path.isdir(out_dir) else ():
      if fname.startswith("model") and ".safetensors" in fname and not os.path.exists(os.path.join(tmp, fname)):
        os.remove(os.path.join(out_dir, fname))
    move_into_place(tmp, out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
