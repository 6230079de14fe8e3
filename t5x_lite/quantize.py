"""Weight-only quantization of a loaded model's params: `t5x_lite.load(path, quantize="int8" | "bfloat16")`.

What is quantized is decided from each parameter's logical axes (its `ParamSpec`), never from its family or name, so
a new family's matmuls follow without a line here. Leading "layers" axes aside, a tensor is a matmul weight when
all its axes are among embed / heads / kv_heads / kv / mlp / vocab and there are at least two:
  * (vocab, embed): the token embedding. Quantized with one scale per vocabulary row: a row gathered for the input
    is its int8 values times its own scale, and as a tied LM head (logits = x @ E^T) the row is an output channel.
    It is most of a small Gemma (Gemma 3 270M: 168 M of its 268 M parameters), so leaving it in float would leave
    most of the memory where it was.
  * first axis embed (q, k, v, wi, wi_0, wi_1, an untied lm_head (embed, vocab), SigLIP's q/k/v and fc1): the input
    axis is the first; one scale per output channel (every other axis, layers included).
  * last axis embed (o, wo, T5Gemma 2's projector, SigLIP's o and fc2): the output axis is the last; one scale per
    output channel of width D, per layer.
Everything else stays as loaded: norm scales, biases, relative-position tables, SigLIP's patch kernel and position
table (axes without a name), classification heads (labels: small, and their few outputs are the answer).

int8 stores qwix `QArray`s (`nn/quant.py`: int8 values, float32 scales = absmax / 127 over the input axes); bfloat16
stores the same tensors as bfloat16 arrays. Both run with activations and accumulation in the compute dtype. With a
mesh, the int8 values keep the float tensor's sharding and the scales follow the same logical axes (their size-1
axes unsharded). `load` quantizes after loading the float params (the converters are unchanged), one tensor at a
time on its devices, deleting each float tensor once its quantized copy exists; the float params are in memory
during loading (peak not measured).
"""

import functools
import math

import jax
import jax.numpy as jnp
import qwix

from t5x_lite import sharding
from t5x_lite.models.params import is_spec
from t5x_lite.models.registry import family_of_config
from t5x_lite.nn.quant import QArray, is_quantized

MODES = ("int8", "bfloat16")
_MATMUL_AXES = frozenset({"embed", "heads", "kv_heads", "kv", "mlp", "vocab"})


def check_mode(quantize) -> None:
  """ValueError unless `quantize` is None, "int8" or "bfloat16"."""
  if quantize is not None and quantize not in MODES:
    raise ValueError(f"quantize must be None, 'int8' or 'bfloat16', got {quantize!r}")


def channel_axes(axes: tuple) -> tuple[int, ...] | None:
  """The axes of a tensor with these logical axes that keep one scale each (layers and output axes), or None when
  the tensor is no matmul weight and stays as loaded (module docstring)."""
  inner = [i for i, a in enumerate(axes) if a != "layers"]
  names = [axes[i] for i in inner]
  if len(names) < 2 or not set(names) <= _MATMUL_AXES or "embed" not in (names[0], names[-1]):
    return None
  if names == ["vocab", "embed"]:
    contracted = {inner[-1]}
  elif names[0] == "embed":
    contracted = {inner[0]}
  else:
    contracted = set(inner[:-1])
  return tuple(i for i in range(len(axes)) if i not in contracted)


def quantize_params(params: dict, config, quantize: str, *, mesh: jax.sharding.Mesh | None = None,
                    free_source: bool = False) -> dict:
  """`params` with their matmul weights stored as `quantize` says ("int8": `QArray`s; "bfloat16": arrays). With
  `free_source`, each float tensor is deleted once its quantized copy exists (only for params no one else holds)."""
  check_mode(quantize)
  specs = family_of_config(config).param_specs(config)

  def one(spec, w):
    if is_quantized(w):
      raise ValueError("these params are quantized already")
    channels = channel_axes(spec.axes)
    if channels is None:
      return w
    if quantize == "bfloat16":
      out = _to_bfloat16(w)
    else:
      out = _to_int8(w, channels)
      if mesh is not None:
        out = jax.device_put(out, QArray(w.sharding, sharding.named_sharding(mesh, spec.axes, out.scale.shape),
                                         None, jnp.int8))
    if free_source and out is not w:
      w.delete()
    return out

  return jax.tree.map(one, specs, params, is_leaf=is_spec)


@jax.jit
def _to_bfloat16(w):
  return w.astype(jnp.bfloat16)


@functools.partial(jax.jit, static_argnums=1)
def _to_int8(w, channels):
  return qwix.quantize(w.astype(jnp.float32), jnp.int8, channelwise_axes=channels)


def dequantize_params(params: dict, dtype="float32") -> dict:
  """Every `QArray` of `params` as a plain array in `dtype` (for saving a quantized model); other leaves unchanged."""
  return jax.tree.map(lambda w: qwix.dequantize(w).astype(dtype) if is_quantized(w) else w, params,
                      is_leaf=is_quantized)


def params_bytes(params) -> int:
  """Bytes the params hold on their devices (int8 values and their scales included), counted once per array: the
  global size, not the per-device share of a sharded one."""
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(params))


def param_count(params) -> int:
  """Parameters in `params`, a quantized weight counting its values only (not its scales)."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(params, is_leaf=is_quantized))
