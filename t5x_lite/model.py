"""`t5x_lite.load` and the `Model` object of the public contract (../shared/design/API.md)."""

import contextlib
import math
import os

import jax
import numpy as np

from t5x_lite import generation, sharding
from t5x_lite import quantize as quantize_lib
from t5x_lite.convert import checkpoint, hf
from t5x_lite.decoding import buckets
from t5x_lite.errors import ConversionError
from t5x_lite.models.registry import family_of_config


def load(path: str, dtype: str = "float32", mesh: jax.sharding.Mesh | str | None = None, *,
         param_dtype: str | None = None, progress: bool = True, quantize: str | None = None) -> "Model":
  """Loads an HF model directory, a t5x_lite checkpoint directory, or a train.py workdir.

  `dtype` is the compute dtype; params are stored in `param_dtype` (default: the same as `dtype`).
  With `mesh` (a Mesh, or a spec such as "data:2,tensor:4" for `t5x_lite.make_mesh`), params are placed sharded
  by the logical-axis rules in `t5x_lite.sharding`. `quantize="int8"` or `"bfloat16"` then stores the matmul weights
  that way (weight-only: activations and accumulation stay in `dtype`); which weights, and where they are
  dequantized: `t5x_lite/quantize.py`, `t5x_lite/nn/quant.py`.
  """
  quantize_lib.check_mode(quantize)
  if isinstance(mesh, str):
    mesh = sharding.make_mesh(mesh)
  elif mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
    raise TypeError(f"mesh must be a jax.sharding.Mesh, a spec string such as 'data:2,tensor:4', or None; "
                    f"got {type(mesh).__name__}")
  param_dtype = param_dtype or dtype
  for d in (dtype, param_dtype):
    if d not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"dtype must be float32, bfloat16 or float16, got {d!r}")
  kind = _source_kind(path)
  if kind == "checkpoint":
    config, params = checkpoint.load_checkpoint(path, mesh=mesh, param_dtype=param_dtype, compute_dtype=dtype)
  elif kind == "workdir":  # its latest checkpoint
    from t5x_lite.training.checkpoints import load_run_params  # pylint: disable=import-outside-toplevel
    config, params, _ = load_run_params(path, mesh=mesh, param_dtype=param_dtype, compute_dtype=dtype)
  else:
    reader = hf.CheckpointReader(path)
    config = hf.load_hf_config(path, reader).replace(dtype=dtype, param_dtype=param_dtype)
    params = hf.load_hf_params(path, config, mesh=mesh, progress=progress, reader=reader)
  if quantize is not None:
    params = quantize_lib.quantize_params(params, config, quantize, mesh=mesh, free_source=True)
  from t5x_lite.tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel
  tokenizer = load_tokenizer(path, family_of_config(config).tokenizer)
  return Model(config, params, tokenizer=tokenizer, mesh=mesh, source_dir=path, quantize=quantize)


def read_config(path: str):
  """The model config of any directory `load` takes, without reading its weights (an HF directory's tensor
  names are read, as they decide tying)."""
  kind = _source_kind(path)
  if kind == "checkpoint":
    return checkpoint.read_config(path)
  if kind == "workdir":
    from t5x_lite.training.checkpoints import read_run_config  # pylint: disable=import-outside-toplevel
    return read_run_config(path)
  return hf.load_hf_config(path)


def _source_kind(path: str) -> str:
  """"checkpoint" (ours), "workdir" (train.py's) or "hf"; ConversionError for anything else."""
  if not os.path.isdir(path):
    raise ConversionError(f"{path}: not a directory")
  if checkpoint.is_checkpoint_dir(path):
    return "checkpoint"
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return "workdir"
  if os.path.exists(os.path.join(path, "config.json")):
    return "hf"
  raise ConversionError(f"{path}: no config.json here: not an HF model directory or a t5x_lite checkpoint")


def _to_host(x: jax.Array) -> np.ndarray:
  """A result as numpy: one spread over other processes' devices too (a mesh over several hosts, infer.py's
  multi-host runs) is gathered first, which every process does alike (a collective)."""
  if not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


class Model:
  """A loaded model: config, params, tokenizer, and numpy-in / numpy-out entry points.

  Inputs follow transformers' conventions: int arrays (B, T), masks with 1 for real tokens.
  """

  def __init__(self, config, params: dict, *, tokenizer=None, mesh: jax.sharding.Mesh | None = None,
               source_dir: str | None = None, quantize: str | None = None):
    self.config = config
    self.quantize = quantize  # how `params` store the matmul weights (None: as `config.param_dtype`)
    self.source_dir = source_dir  # tokenizer files are copied from here on export
    self.params = params
    self.tokenizer = tokenizer
    self.mesh = mesh
    self._family = family = family_of_config(config)
    # `extra`: the keyword inputs beside the ids ({} for text; {"pixel_values_BI3HW": ...} with images).
    self._forward = jax.jit(lambda params, args, extra: family.forward(params, config, *args, **extra))
    self._encode = None if family.encode is None else jax.jit(
        lambda params, ids, mask, extra: family.encode(params, config, ids, mask, **extra))

  # -------------------------------------------------------------------------------------------- inputs

  def _ids(self, x, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
      raise ValueError(f"{name} must be a 2-D integer array (batch, length), got {arr.dtype} {arr.shape}")
    if 0 in arr.shape:
      raise ValueError(f"{name} is empty, shape {arr.shape}: give at least one row of at least one token")
    if arr.size and (arr.min() < 0 or arr.max() >= self.config.vocab_size):
      bad = arr[(arr < 0) | (arr >= self.config.vocab_size)][0]
      raise ValueError(f"{name} holds id {bad}, outside the vocabulary [0, {self.config.vocab_size})")
    return arr.astype(np.int32)

  def _mask(self, x, like: np.ndarray, name: str) -> np.ndarray | None:
    if x is None:
      return None
    arr = np.asarray(x)
    if arr.shape != like.shape:
      raise ValueError(f"{name} has shape {arr.shape}, but its ids have shape {like.shape}")
    return arr.astype(np.int32)

  def _place(self, arr):
    if arr is None or self.mesh is None:
      return arr
    axes = ("act_batch",) + (None,) * (arr.ndim - 1)
    return jax.device_put(arr, sharding.named_sharding(self.mesh, axes, arr.shape))

  def _images(self, pixel_values, ids: np.ndarray, rows: int | None = None) -> dict:
    """{} without images; else the family's per-row layout of `pixel_values` (checked against the image tokens of
    `ids`), padded with empty rows to `rows` (a bucketed batch), as the `extra` inputs of the jitted calls."""
    if pixel_values is None:
      return {}
    if self._family.image_rows is None:
      raise ValueError(f"pixel_values given, but {self.config.family} has no vision encoder")
    per_row = self._family.image_rows(self.config, ids, pixel_values)
    if rows is not None and rows > len(per_row):
      per_row = np.concatenate([per_row, np.zeros((rows - len(per_row), *per_row.shape[1:]), per_row.dtype)])
    return {"pixel_values_BI3HW": self._place(per_row)}

  def _mesh_context(self):
    return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

  # ------------------------------------------------------------------------------------ the contract

  def logits(self, input_ids, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
             pixel_values=None) -> np.ndarray:
    """float32 logits: (B, T, V) for language models (at each decoder position for encoder-decoders);
    (B, labels) for sequence classification; (B, S, labels) for token classification and QA."""
    ids = self._ids(input_ids, "input_ids")
    mask = self._mask(attention_mask, ids, "attention_mask")
    extra = self._images(pixel_values, ids)
    task = self.config.task
    if task == "encoder":
      raise ValueError("this is an encoder-only model: it has no logits; call model.encode(...)")
    dec = dec_mask = None
    if decoder_input_ids is not None:
      dec = self._ids(decoder_input_ids, "decoder_input_ids")
      dec_mask = self._mask(decoder_attention_mask, dec, "decoder_attention_mask")
      if dec.shape[0] != ids.shape[0]:
        raise ValueError(f"decoder_input_ids has {dec.shape[0]} rows but input_ids has {ids.shape[0]}")
      if not self.config.is_encoder_decoder:
        raise ValueError(f"this {self.config.family} model (task {task!r}) has no decoder inputs: pass the "
                         "sequence as input_ids only")
    elif task == "lm" and self.config.is_encoder_decoder:
      raise ValueError("decoder_input_ids is required for an encoder-decoder language model")
    self._family.check_inputs(self.config, ids, dec)
    args = (ids, mask, dec, dec_mask) if self.config.is_encoder_decoder else (ids, mask)
    with self._mesh_context():
      out = self._forward(self.params, tuple(map(self._place, args)), extra)
    return _to_host(out).astype(np.float32)

  def encode(self, input_ids, attention_mask=None, pixel_values=None) -> np.ndarray:
    """Final encoder hidden states, float32 (B, S, D)."""
    if self._encode is None:
      raise ValueError(f"{self.config.family} is decoder-only: it has no encoder")
    ids = self._ids(input_ids, "input_ids")
    mask = self._mask(attention_mask, ids, "attention_mask")
    extra = self._images(pixel_values, ids)
    with self._mesh_context():
      out = self._encode(self.params, self._place(ids), self._place(mask), extra)
    return _to_host(out).astype(np.float32)

  def generate(self, input_ids, attention_mask=None, pixel_values=None, *, max_new_tokens, method="greedy",
               temperature=1.0, top_k=0, top_p=1.0, num_beams=4, length_penalty=1.0, seed=0,
               brevity="hf") -> np.ndarray:
    """(B, max_new_tokens) int32 new tokens; EOS kept, pad after it. See ../shared/design/API.md.

    Shapes are bucketed (batch, prompt and output lengths to powers of two) so varied requests reuse a few
    compiled programs; the loop still stops after `max_new_tokens` or when every row has emitted EOS.
    `brevity="t5x"` uses T5X's ((5 + len) / 6) ** length_penalty in beam search instead of HF's len ** penalty.
    """
    self._check_generation_args(max_new_tokens, method, temperature, top_k, top_p, num_beams, length_penalty,
                                brevity, seed)
    if self.config.task != "lm":
      raise ValueError(f"generate needs a language-model head; this model's task is {self.config.task!r}")
    ids, mask, B = self._bucketed_prompt(input_ids, attention_mask)
    extra = self._images(pixel_values, ids[:B], rows=ids.shape[0])
    new_bucket = buckets.bucket(max_new_tokens)
    fn = generation.generate_fn(self.config, max_new=new_bucket, method=method, temperature=float(temperature),
                                top_k=int(top_k), top_p=float(top_p), num_beams=int(num_beams),
                                length_penalty=float(length_penalty), brevity=brevity)
    done = np.arange(ids.shape[0]) >= B  # batch-padding rows
    with self._mesh_context():
      out = fn(self.params, self._place(ids), self._place(mask), np.int32(max_new_tokens), jax.random.key(seed),
               self._place(done), extra)
    return _to_host(out)[:B, :max_new_tokens].astype(np.int32)

  def score(self, input_ids, target_ids, attention_mask=None, pixel_values=None) -> np.ndarray:
    """(B,) float32 sum of log p(target token) (T5X "score" mode); pad-id targets are skipped.

    Encoder-decoder: the decoder reads the start token then target_ids[:, :-1]. Decoder-only: target_ids
    continue the (left-padded) prompt input_ids.
    """
    if self.config.task != "lm":
      raise ValueError(f"score needs a language-model head; this model's task is {self.config.task!r}")
    ids, mask, B = self._bucketed_prompt(input_ids, attention_mask)
    extra = self._images(pixel_values, ids[:B], rows=ids.shape[0])
    targets = self._ids(target_ids, "target_ids")
    if targets.shape[0] != B:
      raise ValueError(f"target_ids has {targets.shape[0]} rows but input_ids has {B}")
    padded = np.full((ids.shape[0], buckets.bucket(targets.shape[1])), self.config.pad_token_id, np.int32)
    padded[:B, :targets.shape[1]] = targets
    with self._mesh_context():
      out = generation.score_fn(self.config)(self.params, self._place(ids), self._place(mask), self._place(padded),
                                             extra)
    return _to_host(out).astype(np.float32)[:B]

  def _bucketed_prompt(self, input_ids, attention_mask):
    """Prompt ids and mask padded to bucket shapes (decoder-only: on the left), and the real batch size."""
    ids = self._ids(input_ids, "input_ids")
    B, P = ids.shape
    if B == 0 or P == 0:
      raise ValueError(f"input_ids must hold at least one token per row, got shape {ids.shape}")
    mask = self._mask(attention_mask, ids, "attention_mask")
    if mask is None:
      pad = self.config.pad_token_id
      # transformers infers the mask from pad tokens for decoder-only models (not for encoder-decoders).
      infer = not self.config.is_encoder_decoder and pad != self.config.eos_token_id
      mask = (ids != pad).astype(np.int32) if infer else np.ones_like(ids)
    Bb, Pb = buckets.bucket(B, floor=1), buckets.bucket(P)
    out_ids = np.full((Bb, Pb), self.config.pad_token_id, np.int32)
    out_mask = np.zeros((Bb, Pb), np.int32)
    cols = slice(Pb - P, Pb) if not self.config.is_encoder_decoder else slice(0, P)
    out_ids[:B, cols], out_mask[:B, cols] = ids, mask
    return out_ids, out_mask, B

  @staticmethod
  def _check_generation_args(max_new_tokens, method, temperature, top_k, top_p, num_beams, length_penalty, brevity,
                             seed):
    if method not in ("greedy", "sample", "beam"):
      raise ValueError(f"method must be 'greedy', 'sample' or 'beam', got {method!r}")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if method == "sample" and not 0 < temperature < math.inf:
      raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    if method == "beam" and not math.isfinite(length_penalty):
      raise ValueError(f"length_penalty must be finite, got {length_penalty}")
    if not isinstance(seed, (int, np.integer)) or not -2 ** 63 <= seed < 2 ** 63:
      raise ValueError(f"seed must be an integer that fits in int64, got {seed!r}")
    if top_k < 0 or not 0 < top_p <= 1:
      raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1, got top_k={top_k}, top_p={top_p}")
    if method == "beam" and num_beams < 1:
      raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if brevity not in ("hf", "t5x"):
      raise ValueError(f"brevity must be 'hf' or 't5x', got {brevity!r}")

  def save_hf(self, out_dir: str, *, dtype: str | None = None, max_shard_bytes: int = 2 * 1024 ** 3) -> None:
    """Writes config.json + model.safetensors (sharded over `max_shard_bytes`) that transformers loads."""
    hf.save_hf(self._float_params(), self.config, out_dir, dtype=dtype, max_shard_bytes=max_shard_bytes,
               extra_files=hf.tokenizer_files(self.source_dir))

  def save(self, out_dir: str) -> None:
    """Writes our own checkpoint format (orbax params + config.json, tokenizer files beside them)."""
    checkpoint.save_checkpoint(self._float_params(), self.config, out_dir,
                               extra_files=hf.tokenizer_files(self.source_dir))

  def _float_params(self):
    """The params to save: a quantized model's weights dequantized to `config.param_dtype` (the int8 values times
    their scales, not the weights it was loaded from)."""
    return quantize_lib.dequantize_params(self.params, self.config.param_dtype)

  @property
  def processor(self):
    """The text + image processor (`t5x_lite.vision.Processor`) of a model with a vision tower whose directory holds
    the processor files (processor_config.json / preprocessor_config.json) and a tokenizer naming the image tokens;
    None otherwise. Built on first use."""
    if not hasattr(self, "_processor"):
      from t5x_lite.vision.processor import load_processor  # pylint: disable=import-outside-toplevel
      self._processor = None if self.tokenizer is None else load_processor(self.source_dir, self.config,
                                                                            self.tokenizer)
    return self._processor

  def __repr__(self):
    n = quantize_lib.param_count(self.params)
    quantized = f", quantize={self.quantize}" if self.quantize else ""
    return f"Model({self.config.family}/{self.config.model_type}, task={self.config.task}, params={n:,}{quantized})"
