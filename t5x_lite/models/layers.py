"""Helpers every family uses to build and run a stack of identical layers."""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from t5x_lite.nn import quant

class Attention(NamedTuple):
  """One attention of a layer, for memory estimates: its key positions per row and its heads (N query heads over
  K key/value heads of width H)."""
  keys: int
  heads: int
  kv_heads: int
  head_dim: int


class Stack(NamedTuple):
  """A stack of identical layers as a training batch runs it, for memory estimates (t5x_lite/training/memory.py):
  each of `num_layers` layers runs its `attention`s over `length` positions of every row, then an MLP of width
  `mlp_dim` with `mlp_inputs` input projections (2: gated). `rows`: rows of the stack per batch row (the image
  slots of a vision tower; 1 for a text stack). `path`: where its layers' params are ("encoder/layers"), so that a
  frozen stack (train.frozen) is known to keep nothing for the backward pass."""
  num_layers: int
  length: int
  d_model: int
  attention: tuple[Attention, ...]
  mlp_dim: int
  mlp_inputs: int
  rows: int = 1
  path: str = "layers"


REMAT_POLICIES = {
    "none": None,
    "full": "full",
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def scan_layers(layer_fn: Callable, x, stacked_params, *, num_layers: int, rng: jax.Array | None = None,
                remat: str = "none"):
  """Runs `layer_fn(x, layer_params, layer_rng) -> x` over params stacked on a leading layer axis.

  `jax.lax.scan` traces the layer once, so compile time does not grow with depth. `remat` ("none", "full",
  "dots") recomputes activations in the backward pass instead of storing them.
  """
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat must be one of {list(REMAT_POLICIES)}, got {remat!r}")
  fn = layer_fn
  if remat == "full":
    fn = jax.checkpoint(layer_fn)
  elif remat != "none":
    fn = jax.checkpoint(layer_fn, policy=REMAT_POLICIES[remat])
  keys = None if rng is None else jax.random.split(rng, num_layers)

  def body(carry, xs):
    layer_params, key = xs
    return fn(carry, layer_params, key), None

  x, _ = jax.lax.scan(body, x, (stacked_params, keys))
  return x


def unstack_layers(stacked_params, num_layers: int) -> list:
  """The per-layer param trees of a stack, as separate arrays, for incremental decoding.

  A decoding step is bound by reading weights. Indexing a stacked weight inside the step (scan, or a traced
  layer index) makes XLA:CPU/GPU copy that layer's slice before every matmul, doubling the bytes a step moves
  (t5-v1_1-small, batch 8: 75 MB of copies per step). Slicing once per generate call, outside the decoding
  loop, costs one copy of the layer weights and the memory to hold it while the call runs.
  """
  return [jax.tree.map(lambda w, i=i: w[i], stacked_params) for i in range(num_layers)]


def out_in_matrix(kernel: jax.Array, in_dims: int, dtype) -> jax.Array:
  """A kernel (in..., out...) with `in_dims` input axes as a 2-D (O, I) matrix in `dtype`: the layout the decoding
  steps multiply feature-major activations (I, B) with (see `models/t5.py`, incremental decoding). A quantized kernel
  stays int8 (O, I) with per-row scales where the backend dequantizes per step (`nn/quant.py`); the steps multiply
  through `quant.matmul`."""
  return quant.out_in(kernel, in_dims, dtype, keep_quantized=quant.dequantize_mode() == "step")


def heads_from_feature_major(y_OB: jax.Array, num_heads: int, head_dim: int) -> jax.Array:
  """(num_heads * head_dim, B) projections of one decoding position -> (B, 1, num_heads, head_dim)."""
  return y_OB.reshape(num_heads, head_dim, y_OB.shape[-1]).transpose(2, 0, 1)[:, None]


def split_rng(rng: jax.Array | None, n: int) -> list:
  """n keys from `rng`, or n Nones when running without dropout."""
  return [None] * n if rng is None else list(jax.random.split(rng, n))


def embed(embedding_VD: jax.Array, ids_BT: jax.Array, dtype) -> jax.Array:
  """Token embedding lookup in the compute dtype."""
  return quant.take_rows(embedding_VD, ids_BT, dtype)


def dense(x: jax.Array, params: dict) -> jax.Array:
  """x @ kernel (+ bias), in x's dtype."""
  y = x @ quant.weight(params["kernel"], x.dtype)
  if "bias" in params:
    y = y + params["bias"].astype(x.dtype)
  return y


def shift_right(ids_BT: jax.Array, start_id: int, pad_id: int) -> jax.Array:
  """Decoder inputs for targets: [start] + ids[:-1], with -100 (ignored labels) replaced by pad, as transformers'
  encoder-decoders `_shift_right`."""
  shifted = jnp.concatenate([jnp.full_like(ids_BT[:, :1], start_id), ids_BT[:, :-1]], axis=1)
  return jnp.where(shifted == -100, pad_id, shifted)
