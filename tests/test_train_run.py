"""train.py end to end: a tiny UL2 run that is killed with SIGKILL at random steps and restarted ends exactly
where an uninterrupted run ends (same params, losses and examples per step); SIGTERM saves and exits."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import t5x_lite

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12
TINY = [
    f"--gin.TRAIN_STEPS={STEPS}", "--gin.SAVE_EVERY=1", "--gin.BATCH_SIZE=4",
    "--gin.run.max_documents=400", "--gin.run.spm_vocab_size=300",
    "--gin.run.sample_prompts=['Return the <extra_id_0>.']",
    "--gin.run.sample_max_new_tokens=4", "--gin.train.log_every=1", "--gin.train.eval_every=0",
    "--gin.T5Config.vocab_size=448", "--gin.T5Config.d_model=32", "--gin.T5Config.num_heads=2",
    "--gin.T5Config.head_dim=16", "--gin.T5Config.d_ff=64", "--gin.T5Config.dropout_rate=0.1",
    "--gin.DataConfig.inputs_length=64", "--gin.DataConfig.targets_length=32",
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  cache = tmp_path_factory.mktemp("jax_cache")
  return {**os.environ, "PYTHONPATH": REPO, "JAX_COMPILATION_CACHE_DIR": str(cache),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def _cmd(workdir):
  return [sys.executable, os.path.join(REPO, "train.py"), "--gin_file=configs/runs/demo.gin", f"--workdir={workdir}",
          *TINY]


def _metrics(workdir):
  by_step = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      by_step[record["step"]] = record  # the last line for a step counts (a resumed run may log it again)
  return by_step


def _lines(path):
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return f.read().count("\n")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  r = subprocess.run(_cmd(workdir), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  return str(workdir), r


def test_demo_run_logs_checkpoints_and_generates(reference):
  workdir, r = reference
  metrics = _metrics(workdir)
  assert sorted(metrics) == list(range(1, STEPS + 1))
  for key in ("step", "loss", "learning_rate", "tokens_per_sec", "mfu", "accuracy", "grad_norm"):
    assert key in metrics[STEPS]
  assert metrics[STEPS]["loss"] < metrics[1]["loss"]
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  assert "unigram entropy" in r.stderr
  samples = [json.loads(line) for line in open(os.path.join(workdir, "samples.jsonl"))]
  assert samples[0]["prompt"] == "Return the <extra_id_0>." and isinstance(samples[0]["output"], str)
  model = t5x_lite.load(workdir, progress=False)  # a workdir loads as a model (latest checkpoint)
  assert model.tokenizer is not None and model.config.d_model == 32


def test_sigkill_and_resume_matches_uninterrupted_run(reference, tmp_path, env):
  ref_dir, _ = reference
  workdir = str(tmp_path / "interrupted")
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  rng = np.random.default_rng(0)
  kills = 0
  for _ in range(3):  # three kill -9s at random points of progress
    target = _lines(metrics_path) + int(rng.integers(1, 4))
    proc = subprocess.Popen(_cmd(workdir), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and _lines(metrics_path) < target:
      time.sleep(0.02)
    if proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
      kills += 1
    proc.wait()
  assert kills >= 2
  r = subprocess.run(_cmd(workdir), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  ours, ref = _metrics(workdir), _metrics(ref_dir)
  assert sorted(ours) == sorted(ref)
  for step in ref:
    assert ours[step]["data_checksum"] == ref[step]["data_checksum"], f"different examples by step {step}"
    assert ours[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-6), step
  a = t5x_lite.load(workdir, progress=False).params
  b = t5x_lite.load(ref_dir, progress=False).params
  import jax  # pylint: disable=import-outside-toplevel
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7), a, b)


def test_sigterm_saves_and_exits_cleanly(tmp_path, env):
  workdir = str(tmp_path / "preempted")
  cmd = _cmd(workdir)
  cmd[cmd.index(f"--gin.TRAIN_STEPS={STEPS}")] = "--gin.TRAIN_STEPS=100000"
  cmd[cmd.index("--gin.SAVE_EVERY=1")] = "--gin.SAVE_EVERY=1000"
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and _lines(metrics_path) < 3:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  assert "SIGTERM: saved step" in err
  saved = int(err.split("SIGTERM: saved step ")[1].split(",")[0])
  assert os.path.isdir(os.path.join(workdir, "checkpoints", str(saved)))


def test_nonfinite_loss_stops_without_saving(tmp_path, env):
  """An exploding learning rate drives the loss to NaN/inf: the run stops with a clear message, exit code 3,
  and the checkpoints written before stay loadable."""
  workdir = str(tmp_path / "nan")
  cmd = _cmd(workdir) + ["--gin.train.optimizer='adamw'", "--gin.train.schedule='rsqrt'",
                         "--gin.rsqrt_schedule.base_learning_rate=1e38", "--gin.rsqrt_schedule.warmup_steps=1",
                         "--gin.adamw.max_grad_norm=None"]
  r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 3, r.stderr[-2000:]
  assert "became NaN/inf" in r.stderr and "stopped without saving" in r.stderr
  saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  bad_step = int(r.stderr.split("at or before step ")[1].split(";")[0])
  assert all(s < bad_step for s in saved)
  if saved:  # the last good checkpoint loads, with finite params
    params = t5x_lite.load(workdir, progress=False).params
    import jax  # pylint: disable=import-outside-toplevel
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


@pytest.mark.parametrize("args, message", [
    (["--gin_file=configs/runs/no_such_run.gin"], "gin file 'configs/runs/no_such_run.gin' not found"),
    (["--gin_file=configs/runs/demo.gin", "--gin.TRAIN_STEPZ=3"], "no gin file defines the macro TRAIN_STEPZ"),
    (["--gin_file=configs/runs/demo.gin", "--gin.TRAIN_STEPS=abc"], "values are Python literals"),
    (["--gin_file=configs/runs/demo.gin", "--gin.T5Config.d_model='big'"],
     "T5Config.d_model must be an integer, got 'big'"),
])
def test_configuration_mistakes_exit_2_naming_the_problem(tmp_path, env, args, message):
  workdir = tmp_path / "wd"
  r = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), f"--workdir={workdir}", *args], cwd=REPO,
                     env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2, r.stderr[-2000:]
  assert message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
  assert not (workdir / "checkpoints").exists()


def test_unwritable_workdir_exits_2(tmp_path, env):
  blocker = tmp_path / "file"
  blocker.write_text("")
  r = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--gin_file=configs/runs/demo.gin",
                      f"--workdir={blocker}/wd"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2 and f"--workdir {blocker}/wd: cannot create or write it" in r.stderr, r.stderr[-2000:]


def test_multi_host_flags_need_each_other(tmp_path, env):
  for flags, message in [(["--num_processes=2"], "need all of --coordinator_address, --num_processes"),
                         (["--coordinator_address=127.0.0.1:1", "--num_processes=2", "--process_id=5"],
                          "--process_id must be in [0, 2), got 5")]:
    r = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--gin_file=configs/runs/demo.gin",
                        f"--workdir={tmp_path}", *flags], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]


GEMMA_TINY = ["--gin.TRAIN_STEPS=2", "--gin.SAVE_EVERY=1", "--gin.BATCH_SIZE=2", "--gin.train.log_every=1",
              "--gin.GemmaConfig.vocab_size=128", "--gin.GemmaConfig.d_model=32", "--gin.GemmaConfig.d_ff=64",
              "--gin.GemmaConfig.num_layers=2", "--gin.GemmaConfig.num_heads=2", "--gin.GemmaConfig.num_kv_heads=1",
              "--gin.GemmaConfig.head_dim=16", "--gin.GemmaConfig.query_pre_attn_scalar=16",
              "--gin.GemmaConfig.sliding_window=8", "--gin.GemmaConfig.sliding_pattern=2", "--gin.DataConfig.length=32",
              "--gin.run.sample_prompts=['the quick']", "--gin.run.sample_max_new_tokens=3"]


def test_gemma_lm_run_on_files_resumes_refuses_another_model_and_exports(tmp_path, env):
  """configs/runs/gemma_lm.gin end to end on a text file (it crashed at step 1 on GemmaConfig.dropout_rate):
  the workdir carries the tokenizer, a rerun with another model is refused, and the converter exports it."""
  import io
  import sentencepiece as spm
  words = "the quick brown fox jumps over a lazy dog data model token text".split()
  rng = np.random.default_rng(0)
  lines = [" ".join(rng.choice(words, rng.integers(3, 12))) for _ in range(300)]
  (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n")
  tok_dir = tmp_path / "tok"
  tok_dir.mkdir()
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, minloglevel=2, vocab_size=60,
                                 model_type="bpe", pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
                                 eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>")
  (tok_dir / "tokenizer.model").write_bytes(model.getvalue())
  workdir = tmp_path / "wd"
  cmd = [sys.executable, os.path.join(REPO, "train.py"), "--gin_file=configs/runs/gemma_lm.gin",
         f"--workdir={workdir}", f"--gin.run.files=['{tmp_path / 'corpus.txt'}']",
         f"--gin.run.tokenizer_dir='{tok_dir}'", *GEMMA_TINY]
  r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "starting at step 0 from a random initialisation (seed 0)" in r.stderr
  assert (workdir / "samples.jsonl").exists() and set(_metrics(workdir)) == {1, 2}
  loaded = t5x_lite.load(str(workdir), progress=False)
  assert loaded.tokenizer is not None and loaded.tokenizer.encode("the quick") == \
      t5x_lite.tokenizer.load_tokenizer(str(tok_dir), "gemma").encode("the quick")

  r = subprocess.run(cmd + ["--gin.TRAIN_STEPS=3", "--gin.GemmaConfig.mlp_activation='gelu'"], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 2 and "holds a run of another model (mlp_activation: 'gelu_tanh' -> 'gelu')" in r.stderr, \
      r.stderr[-2000:]
  with open(tmp_path / "corpus.txt", "a") as f:
    f.write("a new line of text\n")  # the corpus changed: the resumed run says so
  r = subprocess.run(cmd + ["--gin.TRAIN_STEPS=3"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0 and "resuming from the checkpoint of step 2" in r.stderr, r.stderr[-2000:]
  assert "was trained on another corpus" in r.stderr, r.stderr[-2000:]

  r = subprocess.run([sys.executable, "-m", "t5x_lite.convert", "--to-hf", str(workdir), "--out", str(tmp_path / "hf")],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert (tmp_path / "hf" / "model.safetensors").exists() and (tmp_path / "hf" / "tokenizer.model").exists()
