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
  """Appends metrics to metrics.jsonl (flushed per line) and TensorBoard (only on process 0).

  A run resumed from the checkpoint of step s replays steps s+1, s+2, ... that an interrupted run may have logged
  already: those lines are dropped from the JSONL files (rewritten atomically) and TensorBoard purges its events
  past s, so every step is logged once. Integer metrics (data_checksum) stay integers in JSON and, as they are no
  quantity to plot, stay out of TensorBoard.
  """

  def __init__(self, workdir: str, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.enabled:
      for path in (self.path, self._stream_path("eval")):
        _drop_lines_after(path, resume_step)
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                               purge_step=resume_step + 1 if resume_step else None)

  def _stream_path(self, prefix: str) -> str:
    # Training lines go to metrics.jsonl (one per logging step); other streams (eval) to their own file, so
    # that "the last line for a step" in metrics.jsonl is always the training record.
    return self.path if prefix == "train" else self.path.replace("metrics.jsonl", f"{prefix}_metrics.jsonl")

  def write(self, step: int, metrics: dict, prefix: str = "train"):
    if not self.enabled:
      return
    record = {"step": int(step), **{k: v if isinstance(v, int) else float(v) for k, v in metrics.items()}}
    with open(self._stream_path(prefix), "a") as f:
      f.write(json.dumps(record) + "\n")
    for k, v in metrics.items():
      if not isinstance(v, int):
        self._tb.add_scalar(f"{prefix}/{k}", float(v), int(step))
    self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


def _drop_lines_after(path: str, step: int) -> None:
  """Rewrites the JSONL file at `path` without the records of steps after `step` (and any torn last line)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= step:
        kept.append(line)
    except (ValueError, KeyError, TypeError):
      pass  # a line torn by a kill
  if len(kept) != len(lines):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, path)
