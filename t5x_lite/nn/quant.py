"""Weight-only quantized matmul weights: how the forward pass and the decoding steps read a weight that may be stored
as int8 with per-output-channel scales (or in bfloat16), with activations and accumulation in the compute dtype.

A quantized weight is qwix's `QArray` (`qwix.quantize(w, jnp.int8, channelwise_axes=...)`): a pytree node holding the
int8 values (the weight's shape) and float32 scales (the same rank, 1 on the contracted axes), so `jax.tree.map`,
`lax.scan` over stacked layers, slicing per layer and jit treat it as two plain arrays. qwix fits our pure functions:
its `QArray`, `quantize` and `dequantize` work on plain arrays with no Flax module around them. We call `dequantize`
ourselves rather than `qwix.einsum`/`dot_general`: with a float operand those dequantize the weight before the dot
anyway ("XLA is able to fuse the dequantize and the matmul", qwix/_src/core/dot_general.py), and the decoding steps
want the scale applied after the matmul, on the (O, B) output, which one line here does.

Which weights are quantized, and how a loaded model's params become quantized: `t5x_lite/quantize.py`.

Where a weight is dequantized:
  * forward pass (`logits`, `score`, `encode`): at each read (`weight`), per layer inside the layer scan, so one
    layer's float copy exists at a time;
  * decoding steps: by backend (`DEQUANTIZE`, below). "call": every quantized weight is dequantized (and every
    bfloat16-stored one cast) once per generate call, before the decoding loop (`for_decoding`), and the steps run
    float matmuls; "step": the per-layer (O, I) matrices and the head stay int8 and each step multiplies
    `int8 -> compute dtype` values and applies the per-row scale to the (O, B) product (`matmul`): the weights a
    step reads from memory are int8.
XLA:CPU: the int8 -> float convert is not fused into a dot. Compiled alone, `(q.astype(f32) @ x) * s` is a loop
fusion writing the whole float32 weight, which the dot (an XNNPACK fusion) then reads. In a generate call XLA's
loop-invariant code motion hoists that convert out of the decoding loop (the compiled while body of a "step" generate
holds no convert of the weights), so on CPU "step" runs as "call" does, and both decode at float32's speed
(bench/README.md: bench/bench_quantized.py, same tokens/s within the run's noise at batch 1, 8 and 32). "call" is the
CPU default because it says what happens instead of relying on that pass: the params stay int8 at rest, and each
generate call makes one dequantizing pass over the weights (the float32 path already copies each layer's weights
once per call into the (O, I) layout; the dequantization rides on that copy) and holds the float weights while it
runs. GPU and TPU default to "step", meant to keep the weights int8 in device memory while decoding; whether XLA
fuses the convert into the matmul there, or hoists it as on CPU, is not measured here (no accelerator was available
to the session that wrote this). `T5X_LITE_DEQUANTIZE=call|step` overrides the choice.
"""

import math
import os

import jax
import jax.numpy as jnp
import qwix

QArray = qwix.QArray

_DEFAULT_DEQUANTIZE = {"cpu": "call"}  # other backends: "step"
DEQUANTIZE = os.environ.get("T5X_LITE_DEQUANTIZE", "auto")  # auto | call | step


def is_quantized(w) -> bool:
  return isinstance(w, QArray)


def dequantize_mode() -> str:
  """"call" or "step" (see the module docstring) for the default backend, unless T5X_LITE_DEQUANTIZE says."""
  if DEQUANTIZE == "auto":
    return _DEFAULT_DEQUANTIZE.get(jax.default_backend(), "step")
  if DEQUANTIZE not in ("call", "step"):
    raise ValueError(f"T5X_LITE_DEQUANTIZE must be auto, call or step, got {DEQUANTIZE!r}")
  return DEQUANTIZE


def weight(w, dtype) -> jax.Array:
  """`w` as a plain array in `dtype`: a stored float weight cast, a quantized one dequantized (in float32, then cast,
  so a bfloat16 compute dtype rounds the product once)."""
  if isinstance(w, QArray):
    return qwix.dequantize(w).astype(dtype)
  return w.astype(dtype)


def take_rows(table_VD, ids_BT: jax.Array, dtype) -> jax.Array:
  """Rows `ids_BT` of an embedding table (V, D) -> (B, T, D) in `dtype`; a quantized table (one scale per row) gathers
  its int8 rows and their scales, never dequantizing the whole table."""
  if isinstance(table_VD, QArray):
    rows = jnp.take(table_VD.qvalue, ids_BT, axis=0).astype(jnp.float32)
    return (rows * jnp.take(table_VD.scale, ids_BT, axis=0)).astype(dtype)
  return jnp.take(table_VD, ids_BT, axis=0).astype(dtype)


def out_in(kernel, in_dims: int, dtype, keep_quantized: bool):
  """A kernel (in..., out...) with `in_dims` input axes as a 2-D (O, I) matrix: in `dtype`, or, for a quantized kernel
  with `keep_quantized`, as an int8 (O, I) `QArray` with one scale per row (O, 1)."""
  n_in, n_out = math.prod(kernel.shape[:in_dims]), math.prod(kernel.shape[in_dims:])  # qwix's reshape takes no -1
  if isinstance(kernel, QArray) and keep_quantized:
    return kernel.reshape(n_in, n_out).T
  return weight(kernel.reshape(n_in, n_out).T, dtype)


def stack(ws: list):
  """`jnp.stack` of (O, I) matrices that may be `QArray`s (their values and scales stacked alike)."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *ws)


def matmul(w_xOI, x_IB: jax.Array) -> jax.Array:
  """w @ x for an (..., O, I) weight and feature-major activations (I, B) -> (..., O, B) in x's dtype. A quantized
  weight (scales (..., O, 1)) multiplies its int8 values converted to x's dtype and scales the (..., O, B) product
  per row: the per-output-channel scale commutes with the contraction, so the weight is never dequantized whole."""
  if isinstance(w_xOI, QArray):
    y = jnp.einsum("...OI,IB->...OB", w_xOI.qvalue.astype(x_IB.dtype), x_IB)
    return y * w_xOI.scale.astype(x_IB.dtype)
  return jnp.einsum("...OI,IB->...OB", w_xOI.astype(x_IB.dtype), x_IB)


def for_decoding(params, dtype):
  """Params for a generate call: with the "call" mode, every quantized weight dequantized and every float weight
  stored narrower than `dtype` (bfloat16 storage, float32 compute) upcast, to `dtype`, inside the call's jit (XLA
  frees them when it ends); with "step", `params` unchanged. Without this the decoding steps would cast a bfloat16
  head (Gemma's 262144 x 640 tied embedding) at every step, the same separate convert pass as int8's. Only upcasts:
  every reader would widen such a weight anyway, so the values are the same; a wider weight is left as stored."""
  if dequantize_mode() == "step":
    return params
  dtype = jnp.dtype(dtype)

  def one(w):
    if isinstance(w, QArray):
      return weight(w, dtype)
    narrower = jnp.issubdtype(w.dtype, jnp.floating) and jnp.finfo(w.dtype).bits < jnp.finfo(dtype).bits
    return w.astype(dtype) if narrower else w

  return jax.tree.map(one, params, is_leaf=lambda w: isinstance(w, QArray))
