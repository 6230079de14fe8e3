"""Two processes on one machine (2 CPU devices each, gloo collectives) train to the same losses and params as
one process with 4 devices and the same global batch; each process reads only its own share of the data; and a
two-process run killed with SIGKILL after a checkpoint resumes exactly (each process restores its own iterator).
Pod behaviour with processes as hosts: SIGTERM on one host stops both at one step; a run resumes on other device and
process counts (elastic); a hybrid mesh with processes as slices equals one process; a missing coordinator exits 2."""

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


def _start_two(workdir, cache, *extra, devices=2):
  port = _free_port()
  return [subprocess.Popen(_cmd(workdir, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                f"--process_id={i}", *extra), cwd=REPO, env=_env(devices, cache),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]


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


def _assert_same_run(ours, ref, rel=1e-5):
  a, b = _metrics(ref), _metrics(ours)
  assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
  for step in a:
    assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=rel), step
    assert b[step]["tokens"] == a[step]["tokens"], step
    assert b[step]["data_checksum"] == a[step]["data_checksum"], step  # the same global batch, example for example
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


def test_no_coordinator_is_a_clear_error_in_time(tmp_path):
  """Process 1 of 2 with nobody at the coordinator's address: one line naming it, exit 2, within the timeout."""
  address = f"127.0.0.1:{_free_port()}"
  started = time.time()
  r = subprocess.run(_cmd(str(tmp_path / "w"), f"--coordinator_address={address}", "--num_processes=2",
                          "--process_id=1", "--coordinator_timeout=3"), cwd=REPO, env=_env(2, str(tmp_path)),
                     capture_output=True, text=True, timeout=120)
  took = time.time() - started
  assert r.returncode == 2, r.stderr[-3000:]
  assert f"could not join the coordinator at {address}" in r.stderr and "--coordinator_timeout=3 s" in r.stderr
  assert "Traceback" not in r.stderr and "DEADLINE_EXCEEDED" not in r.stderr, r.stderr[-3000:]
  assert took < 3 + 30, took  # the timeout plus the start-up (imports) of a loaded 2-core machine


def _lines(path):
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return f.read().count("\n")


MESH8 = "data:2,fsdp:2,tensor:2"
NO_REPORT = "--gin.run.report_spans=False"


def _mesh(spec):
  return f"--gin.train.mesh_spec='{spec}'"


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory, cache):
  """The uninterrupted reference of the elastic and hybrid runs: one process, 8 devices, weights over fsdp and
  tensor (so that a restore on fewer devices must reshard them)."""
  workdir = str(tmp_path_factory.mktemp("eight"))
  r = subprocess.run(_cmd(workdir, _mesh(MESH8), NO_REPORT), cwd=REPO, env=_env(8, cache), capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  return workdir


def test_sigterm_to_one_process_of_a_hybrid_mesh_stops_both_at_one_step(eight_devices, tmp_path, cache):
  """Two processes of 4 devices each on the hybrid mesh dcn_data:2,fsdp:2,tensor:2 (each process a slice: the
  reference's mesh shape, built by create_hybrid_device_mesh). SIGTERM reaches process 1 only (a preempted host):
  both save the same step and exit 0, and the restarted pair ends on the single-process run's losses, examples
  (data_checksum per step) and params."""
  workdir = str(tmp_path / "preempted")
  hybrid = _mesh("dcn_data:2,fsdp:2,tensor:2")
  procs = _start_two(workdir, cache, hybrid, devices=4)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and _lines(metrics) < 2 and all(p.poll() is None for p in procs):
    time.sleep(0.01)
  assert all(p.poll() is None for p in procs), "the pair ended before it could be preempted"
  procs[1].send_signal(signal.SIGTERM)
  errs = _finish(procs)
  saved = [int(err.split(": saved step ")[1].split(",")[0]) for err in errs]
  assert "SIGTERM: saved step" in errs[1] and "another process" in errs[0], errs[0][-2000:]
  assert saved[0] == saved[1] < STEPS, saved
  errs = _finish(_start_two(workdir, cache, hybrid, devices=4))
  assert f"resuming from the checkpoint of step {saved[0]}" in errs[0], errs[0][-2000:]
  _assert_same_run(workdir, eight_devices)


def _kill_after_checkpoint(procs, workdir, after):
  """SIGKILL every process once a checkpoint past step `after` is complete; returns that step."""
  directory = os.path.join(workdir, "checkpoints")
  deadline = time.time() + 300
  done = lambda: [int(n) for n in os.listdir(directory) if n.isdigit() and int(n) > after] \
      if os.path.isdir(directory) else []  # noqa: E731  (orbax renames a finished step's directory to its number)
  while time.time() < deadline and not done() and all(p.poll() is None for p in procs):
    time.sleep(0.01)
  running = all(p.poll() is None for p in procs)
  for p in procs:
    p.send_signal(signal.SIGKILL)
    p.communicate()
  assert running and done(), "the run ended before it could be killed after a checkpoint"
  return min(done())


def test_elastic_resume_on_other_device_and_process_counts(eight_devices, tmp_path, cache):
  """1 process x 8 devices, killed; resumed on 2 processes x 2 devices, killed; finished on 1 process x 2 devices.
  The global batch of every step is the uninterrupted run's (data_checksum per step), the losses agree within 1e-5
  and the final params within rtol 1e-5 / atol 1e-6 (the reductions run in another order on other meshes); a
  restart with another global batch is refused, naming both."""
  workdir = str(tmp_path / "elastic")
  first = subprocess.Popen(_cmd(workdir, _mesh(MESH8), NO_REPORT), cwd=REPO, env=_env(8, cache),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  saved = _kill_after_checkpoint([first], workdir, 0)
  second = _start_two(workdir, cache, _mesh("fsdp:2,tensor:2"))
  saved_again = _kill_after_checkpoint(second, workdir, saved)
  refused = subprocess.run(_cmd(workdir, "--gin.BATCH_SIZE=8", NO_REPORT), cwd=REPO, env=_env(2, cache),
                           capture_output=True, text=True, timeout=600)
  assert refused.returncode == 2 and "global batch of 4 rows and this run's is 8" in refused.stderr, refused.stderr
  last = subprocess.run(_cmd(workdir, _mesh("fsdp:2"), NO_REPORT), cwd=REPO, env=_env(2, cache),
                        capture_output=True, text=True, timeout=600)
  assert last.returncode == 0, last.stderr[-3000:]
  assert f"resuming from the checkpoint of step {saved_again}" in last.stderr, (saved, saved_again)
  assert 0 < saved < saved_again < STEPS
  _assert_same_run(workdir, eight_devices)


def _infer(model, source, output, *extra):
  return [sys.executable, "infer.py", f"--model={model}", f"--input={source}", f"--output={output}",
          "--batch-size=2", "--max-new-tokens=6", "--method=sample", "--mesh=fsdp:2,tensor:2", *extra]


def _start_two_infer(cmd, cache):
  port = _free_port()
  return [subprocess.Popen(cmd + [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                  f"--process_id={i}"], cwd=REPO, env=_env(2, cache), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True) for i in range(2)]


def test_two_process_infer_writes_the_one_process_file_and_resumes(eight_devices, tmp_path, cache):
  """infer.py (sampling, so that every token follows the logits) on the trained workdir, its weights sharded
  fsdp:2,tensor:2: over 4 devices of one process, and over 2 processes x 2 devices (process 0 alone writing), the
  same bytes; a two-process run killed with SIGKILL after its first batches completes the file on a rerun, again
  the same bytes."""
  source = tmp_path / "in.jsonl"
  source.write_text("".join(json.dumps({"text": f"Return the {w} of the <extra_id_0>."}) + "\n"
                            for w in ("value", "name", "list", "path", "file", "object", "string", "number",
                                      "result", "module", "class", "type")))
  one, two, killed = (str(tmp_path / f"{name}.jsonl") for name in ("one", "two", "killed"))
  r = subprocess.run(_infer(eight_devices, source, one), cwd=REPO, env=_env(4, cache), capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  expected = open(one, "rb").read()
  assert expected.count(b"\n") == 12 and b'"output"' in expected
  errs = _finish(_start_two_infer(_infer(eight_devices, source, two), cache))
  assert open(two, "rb").read() == expected
  assert "wrote" in errs[0] and "wrote" not in errs[1]
  procs = _start_two_infer(_infer(eight_devices, source, killed), cache)
  deadline = time.time() + 300
  while time.time() < deadline and _lines(killed) < 2 and all(p.poll() is None for p in procs):
    time.sleep(0.01)
  running = all(p.poll() is None for p in procs)
  for p in procs:
    p.send_signal(signal.SIGKILL)
    p.communicate()
  assert running and 2 <= _lines(killed) < 12, "the pair ended before it could be killed mid-file"
  errs = _finish(_start_two_infer(_infer(eight_devices, source, killed), cache))
  assert "resumed at line" in errs[0], errs[0][-2000:]
  assert open(killed, "rb").read() == expected
  address = f"127.0.0.1:{_free_port()}"  # and infer.py's process 1 without its coordinator: exit 2 naming it
  r = subprocess.run(_infer(eight_devices, source, str(tmp_path / "alone.jsonl"), f"--coordinator_address={address}",
                            "--num_processes=2", "--process_id=1", "--coordinator_timeout=3"), cwd=REPO,
                     env=_env(2, cache), capture_output=True, text=True, timeout=120)
  assert r.returncode == 2 and f"infer.py: error: process 1 of 2 could not join the coordinator at {address}" \
      in r.stderr, r.stderr[-3000:]
