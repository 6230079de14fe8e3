"""Two processes on one machine (2 CPU devices each, gloo collectives) train to the same losses and params as
one process with 4 devices and the same global batch; each process reads only its own share of the data."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import t5x_lite

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--gin_file=configs/runs/demo.gin", "--gin.TRAIN_STEPS=6", "--gin.SAVE_EVERY=3", "--gin.BATCH_SIZE=4",
        "--gin.run.max_documents=300", "--gin.run.spm_vocab_size=300", "--gin.run.sample_prompts=[]",
        "--gin.train.log_every=1", "--gin.train.eval_every=0", "--gin.train.progress=False",
        "--gin.T5Config.vocab_size=448", "--gin.T5Config.d_model=32", "--gin.T5Config.num_heads=2",
        "--gin.T5Config.head_dim=16", "--gin.T5Config.d_ff=64",
        "--gin.DataConfig.inputs_length=64", "--gin.DataConfig.targets_length=32"]


def _env(devices, cache):
  return {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
          "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _metrics(workdir):
  out = {}
  for line in open(os.path.join(workdir, "metrics.jsonl")):
    r = json.loads(line)
    out[r["step"]] = r
  return out


def test_two_processes_equal_one(tmp_path):
  cache = str(tmp_path / "cache")
  one = str(tmp_path / "one")
  r = subprocess.run([sys.executable, "train.py", f"--workdir={one}", *ARGS], cwd=REPO, env=_env(4, cache),
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  two = str(tmp_path / "two")
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, "train.py", f"--workdir={two}", *ARGS,
                             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
                            cwd=REPO, env=_env(2, cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  a, b = _metrics(one), _metrics(two)
  assert sorted(a) == sorted(b) == list(range(1, 7))
  for step in a:
    assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5), step
    assert b[step]["tokens"] == a[step]["tokens"]
  pa = t5x_lite.load(one, progress=False).params
  pb = t5x_lite.load(two, progress=False).params
  import jax  # pylint: disable=import-outside-toplevel
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6), pa, pb)
