"""Two processes on one machine (2 CPU devices each, gloo collectives) train to the same losses and params as
one process with 4 devices and the same global batch; each process reads only its own share of the data; and a
two-process run killed with SIGKILL after a checkpoint resumes exactly (each process restores its own iterator)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import t5x_lite

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12
ARGS = [f"--gin.TRAIN_STEPS={STEPS}", "--gin.SAVE_EVERY=3", "--gin.BATCH_SIZE=4", "--gin.run.max_documents=300",
        "--gin.run.spm_vocab_size=300", "--gin.run.sample_prompts=[]", "--gin.train.log_every=1",
        "--gin.train.eval_every=0", "--gin.train.progress=False",
        "--gin.T5Config.vocab_size=448", "--gin.T5Config.d_model=32", "--gin.T5Config.num_heads=2",
        "--gin.T5Config.head_dim=16", "--gin.T5Config.d_ff=64",
        "--gin.DataConfig.inputs_length=64", "--gin.DataConfig.targets_length=32"]


def _cmd(workdir, *extra):
  return [sys.executable, "train.py", "--gin_file=configs/runs/demo.gin", f"--workdir={workdir}", *ARGS, *extra]


def _env(devices, cache):
  return {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
          "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start_two(workdir, cache):
  port = _free_port()
  return [subprocess.Popen(_cmd(workdir, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                f"--process_id={i}"), cwd=REPO, env=_env(2, cache), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True) for i in range(2)]


def _finish(procs):
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return [err for _, err in outs]


def _metrics(workdir):
  out = {}
  for line in open(os.path.join(workdir, "metrics.jsonl")):
    r = json.loads(line)
    out[r["step"]] = r  # the last line for a step counts
  return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, cache):
  workdir = str(tmp_path_factory.mktemp("one"))
  r = subprocess.run(_cmd(workdir), cwd=REPO, env=_env(4, cache), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  return workdir


def _assert_same_run(ours, ref):
  a, b = _metrics(ref), _metrics(ours)
  assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
  for step in a:
    assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5), step
    assert b[step]["tokens"] == a[step]["tokens"], step
  pa = t5x_lite.load(ref, progress=False).params
  pb = t5x_lite.load(ours, progress=False).params
  import jax  # pylint: disable=import-outside-toplevel
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6), pa, pb)


def test_two_processes_equal_one(one_process, tmp_path, cache):
  two = str(tmp_path / "two")
  _finish(_start_two(two, cache))
  _assert_same_run(two, one_process)


def test_two_processes_killed_and_resumed_equal_one(one_process, tmp_path, cache):
  """Both processes get SIGKILL once the step-6 checkpoint is complete (as a preempted pod job); the restarted
  pair resumes from it and must follow the uninterrupted run: every host restores its own iterator state (by
  step 6 the two hosts' lanes stand at different places of the stream, so one shared state would not do)."""
  workdir = str(tmp_path / "killed")
  procs = _start_two(workdir, cache)
  first = os.path.join(workdir, "checkpoints", "6")
  deadline = time.time() + 300
  while time.time() < deadline and not os.path.isdir(first) and all(p.poll() is None for p in procs):
    time.sleep(0.01)
  running = all(p.poll() is None for p in procs)
  for p in procs:
    p.send_signal(signal.SIGKILL)
    p.communicate()
  assert running and os.path.isdir(first), "the pair ended before its first checkpoint could be interrupted"
  errs = _finish(_start_two(workdir, cache))
  resumed_at = int(errs[0].split("resuming from the checkpoint of step ")[1].split()[0])
  assert 6 <= resumed_at < STEPS, errs[0][-2000:]
  _assert_same_run(workdir, one_process)
  states = [open(os.path.join(workdir, "checkpoints", str(resumed_at), "data", f"process_{i}-of-2.json")).read()
            for i in range(2)]
  assert states[0] != states[1]  # else restoring one host's state on both would pass this test too
