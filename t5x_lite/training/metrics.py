"""Run metrics: one JSON object per logging step in WORKDIR/metrics.jsonl (eval: eval_metrics.jsonl),
TensorBoard event files, and the FLOP/s measures (tokens/s, MFU against a matmul peak measured at start-up)."""

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np


def measure_matmul_peak(n: int = 1024, repeats: int = 5) -> float:
  """FLOP/s of an n x n matmul in the dtype this backend trains fastest in (float32 on CPU, bf16 elsewhere)."""
  dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), dtype)
  f = jax.jit(lambda x: x @ x)
  jax.block_until_ready(f(a))
  best = math.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(a))
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best * jax.device_count()


class MetricsWriter:
  """Appends metrics to metrics.jsonl (flushed per line) and TensorBoard (only on process 0)."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict, prefix: str = "train"):
    if not self.enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    # Training lines go to metrics.jsonl (one per logging step); other streams (eval) to their own file, so
    # that "the last line for a step" in metrics.jsonl is always the training record.
    path = self.path if prefix == "train" else self.path.replace("metrics.jsonl", f"{prefix}_metrics.jsonl")
    with open(path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for k, v in metrics.items():
      self._tb.add_scalar(f"{prefix}/{k}", float(v), int(step))
    self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()
