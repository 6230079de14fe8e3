"""Per-device memory of a training step, counted from shapes: nothing is allocated, traced or compiled.

Params, optimizer state and gradients are exact: each array's shard on one device (its NamedSharding's shard shape,
which works on a `jax.sharding.AbstractMesh`, so a 64-device mesh needs no 64 devices). Activations are an
estimate from the stacks a family declares (`Family.activation_stacks`), written out in `activation_bytes`. What
neither counts: XLA's temporaries beyond the ones named there (fusion buffers, the update tree of the optimizer
step, collective buffers) and the input batch.
"""

import math

import jax
import numpy as np

from t5x_lite.models.layers import Stack


def tree_bytes_per_device(tree, shardings) -> int:
  """Bytes one device holds of `tree` (arrays or ShapeDtypeStructs) placed by `shardings` (a tree of
  NamedShardings like it); the largest shard when a dimension does not split evenly."""
  return sum(math.prod(sharding.shard_shape(tuple(x.shape))) * np.dtype(x.dtype).itemsize
             for x, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True))


def _split(size: int, tensor: int) -> int:
  """How many ways a head / MLP / vocabulary dimension of `size` is split over the tensor axis (the rules table
  puts heads, kv_heads, mlp and vocab activations on it, and replicates a dimension the axis does not divide)."""
  return tensor if size % tensor == 0 else 1


def layer_residuals(stack: Stack, remat: str, tensor: int) -> int:
  """Elements (compute dtype) one layer of `stack` keeps per row for the backward pass, per device.

  With s = positions, D = width, and per attention q = N x H / t, kv = K x H / t over `keys` positions,
  m = MLP input projections of width F / t (t: the tensor-axis split of that dimension):
    full: s D                                     the layer's input (the scan carry); the rest is recomputed
    dots: s D + sum_att (s q + 2 keys kv + s D) + s m F + s D
          + the outputs of every matmul without batch dims (dots_with_no_batch_dims_saveable): each attention's
          q, k, v and output projections, the MLP's input and output projections
    none: dots + sum_att (s D + s q) + s D + 2 s F
          + each sublayer's normalised input, each attention's output before its projection, the MLP's
          activation and its derivative (or gate product)
  Attention probabilities are never kept: nn/attention_core.py recomputes them in the backward pass.
  """
  s, D = stack.length, stack.d_model
  F = stack.mlp_dim // _split(stack.mlp_dim, tensor)
  carry = s * D
  if remat == "full":
    return carry
  attention = 0
  for a in stack.attention:
    q = a.heads // _split(a.heads, tensor) * a.head_dim
    kv = a.kv_heads // _split(a.kv_heads, tensor) * a.head_dim
    attention += s * q + 2 * a.keys * kv + s * D
    if remat == "none":
      attention += s * D + s * q
  mlp = s * stack.mlp_inputs * F + s * D
  if remat == "none":
    mlp += s * D + 2 * s * F
  elif remat != "dots":
    raise ValueError(f"remat must be one of none, dots, full; got {remat!r}")
  return carry + attention + mlp


def activation_bytes(stacks: tuple[Stack, ...], *, rows: int, remat: str, dtype_bytes: int, tensor: int,
                     logits_positions: int, vocab: int, frozen: tuple[str, ...] = ()) -> dict[str, int]:
  """Estimated activation bytes per device for `rows` batch rows per device (a microbatch's share):

    saved      = sum_stacks rows x stack.rows x L x layer_residuals(remat) x dtype_bytes
                 (+ rows x stack.rows x L x s x sum_att N / t x 4 with remat none: each attention's float32
                 log-sum-exp per query row, its one residual besides q, k, v and its output)
    transient  = the largest layer's working set while its backward runs: 2 x rows x stack.rows x N / t x s x keys
                 x 4 (float32 logits recomputed, and their gradient), plus with remat dots / full that layer's
                 residuals, recomputed (layer_residuals("none"))
    logits     = 2 x rows x logits_positions x V / t x 4 (the head's float32 logits and their gradient)
  and `total`, their sum. A stack under a `frozen` params path (train.frozen: "vision") gets no gradient, so it
  keeps nothing for the backward pass: only its forward working set counts as transient, rows x stack.rows x
  (N / t x s x keys x 4 + s x D x dtype_bytes) (one attention's float32 logits, and its output).
  """
  saved = transient = 0
  for stack in stacks:
    n = rows * stack.rows
    if any(f"{stack.path}/".startswith(f"{prefix.strip('/')}/") for prefix in frozen):
      transient = max(transient, n * max((a.heads // _split(a.heads, tensor)) * stack.length * a.keys * 4
                                         for a in stack.attention) + n * stack.length * stack.d_model * dtype_bytes)
      continue
    saved += n * stack.num_layers * layer_residuals(stack, remat, tensor) * dtype_bytes
    if remat == "none":
      heads = sum(a.heads // _split(a.heads, tensor) for a in stack.attention)
      saved += n * stack.num_layers * stack.length * heads * 4
    work = max(2 * n * (a.heads // _split(a.heads, tensor)) * stack.length * a.keys * 4 for a in stack.attention)
    if remat != "none":
      work += n * layer_residuals(stack, "none", tensor) * dtype_bytes
    transient = max(transient, work)
  logits = 2 * rows * logits_positions * (vocab // _split(vocab, tensor)) * 4
  return {"saved": int(saved), "transient": int(transient), "logits": int(logits),
          "total": int(saved + transient + logits)}
