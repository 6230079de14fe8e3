"""train.py end to end: a tiny UL2 run that is killed with SIGKILL at random steps and restarted ends exactly
where an uninterrupted run ends (same params, losses and examples per step); SIGTERM saves and exits."""

import fcntl
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import sentencepiece as spm

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


def _snapshot(directory) -> dict:
  """Every file under `directory` (relative path -> sha256 of its bytes)."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return out


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
  with open(os.path.join(workdir, "metrics.jsonl")) as f:  # replayed steps replace what the killed runs logged
    assert [json.loads(line)["step"] for line in f] == list(range(1, STEPS + 1))
  for step in ref:
    assert ours[step]["data_checksum"] == ref[step]["data_checksum"], f"different examples by step {step}"
    assert ours[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-6), step
  a = t5x_lite.load(workdir, progress=False).params
  b = t5x_lite.load(ref_dir, progress=False).params
  import jax  # pylint: disable=import-outside-toplevel
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7), a, b)


@pytest.mark.parametrize("sig, name", [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "Ctrl-C")])
def test_sigterm_and_ctrl_c_save_and_exit_cleanly(tmp_path, env, sig, name):
  """SIGTERM or a first Ctrl-C saves and exits 0; while the run holds its workdir, a second train.py on it exits 2
  naming the holder (both used to run, interleaving metrics.jsonl and overwriting each other's checkpoints)."""
  workdir = str(tmp_path / "preempted")
  cmd = _cmd(workdir)
  cmd[cmd.index(f"--gin.TRAIN_STEPS={STEPS}")] = "--gin.TRAIN_STEPS=100000"
  cmd[cmd.index("--gin.SAVE_EVERY=1")] = "--gin.SAVE_EVERY=1000"
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and _lines(metrics_path) < 3:
    time.sleep(0.05)
  if sig == signal.SIGTERM:
    second = subprocess.run(_cmd(workdir), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"{workdir} is in use by another train.py run (pid {proc.pid} on" in second.stderr, second.stderr[-2000:]
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  assert f"{name}: saved step" in err and "Traceback" not in err
  saved = int(err.split(f"{name}: saved step ")[1].split(",")[0])
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
  assert "became NaN/inf" in r.stderr and "stopped without saving" in r.stderr and "step None" not in r.stderr
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
    (["--gin_file=configs/runs/demo.gin", "--gin.TRAIN_STEPS='5'", *TINY[1:]],
     "train.train_steps must be an integer, got '5' (str)"),
    (["--gin_file=configs/runs/demo.gin", *TINY, "--gin.TRAIN_STEPS=-5"], "train.train_steps must be >= 1, got -5"),
    (["--gin_file=configs/runs/demo.gin", *TINY, "--gin.SAVE_EVERY=0"], "train.save_every must be >= 1, got 0"),
    (["--gin_file=configs/runs/demo.gin", *TINY, "--gin.train.log_every='10'"],
     "train.log_every must be an integer, got '10' (str)"),
    (["--gin_file=configs/runs/demo.gin", *TINY, "--gin.cosine_schedule.peak_learning_rate='1.0'"],
     "cosine_schedule.peak_learning_rate must be a number, got '1.0' (str)"),
    (["--gin_file=configs/runs/demo.gin", *TINY, "--gin.DataConfig.inputs_length=0"],
     "DataConfig.inputs_length must be >= 1, got 0"),
    (["--gin_file=configs/runs/demo.gin", *TINY, "--gin.BATCH_SIZE=3.5"],
     "DataConfig.batch_size must be an integer, got 3.5 (float)"),
])
def test_configuration_mistakes_exit_2_naming_the_problem(tmp_path, env, args, message):
  workdir = tmp_path / "wd"
  r = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), f"--workdir={workdir}", *args], cwd=REPO,
                     env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2, r.stderr[-2000:]
  assert message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
  assert not workdir.exists() or not any(workdir.iterdir())  # refused before anything was written


def test_corrupt_checkpoint_is_named_with_the_other_steps(reference, tmp_path, env):
  """A checkpoint whose tensor data was truncated: load, infer.py and a resuming train.py each name the step, the
  tensor and the run's other checkpoints in one line (they printed TensorStore's tracebacks)."""
  workdir = tmp_path / "corrupt"
  shutil.copytree(reference[0], workdir)
  for chunk in (workdir / "checkpoints" / str(STEPS) / "params").glob("ocdbt.process_*/d/*"):
    chunk.write_bytes(b"")
  expected = (f"checkpoint step {STEPS} in {workdir}/checkpoints is unreadable (ValueError: OUT_OF_RANGE: Error "
              "reading \"")
  others = f"the run's other checkpoints are steps {STEPS - 2}, {STEPS - 1}: move {workdir}/checkpoints/{STEPS} aside"
  with pytest.raises(t5x_lite.ConversionError) as e:
    t5x_lite.load(str(workdir), progress=False)
  assert expected in str(e.value) and others in str(e.value)
  (tmp_path / "in.jsonl").write_text('{"text": "Return the value."}\n')
  r = subprocess.run([sys.executable, os.path.join(REPO, "infer.py"), "--model", str(workdir), "--input",
                      str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 2 and expected in r.stderr and others in r.stderr and "Traceback" not in r.stderr, r.stderr
  cmd = _cmd(workdir)
  cmd[cmd.index(f"--gin.TRAIN_STEPS={STEPS}")] = f"--gin.TRAIN_STEPS={STEPS + 2}"
  r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2 and expected in r.stderr and others in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_logged_metrics_are_window_means(reference, tmp_path, env):
  """With log_every=4 a line carries the means of its four steps (T5X's summaries), not the last step's values;
  data_checksum stays an integer in metrics.jsonl and out of TensorBoard."""
  workdir = str(tmp_path / "windows")
  cmd = _cmd(workdir) + ["--gin.train.log_every=4", "--gin.run.sample_prompts=[]"]
  r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  every, windows = _metrics(reference[0]), _metrics(workdir)
  assert sorted(windows) == [4, 8, 12]
  for step in windows:
    for key in ("loss", "accuracy", "grad_norm", "tokens"):
      mean = sum(every[s][key] for s in range(step - 3, step + 1)) / 4
      assert windows[step][key] == pytest.approx(mean, rel=1e-5), (step, key)
    assert windows[step]["learning_rate"] == every[step]["learning_rate"]
  assert isinstance(every[1]["data_checksum"], int)
  events = b"".join(p.read_bytes() for p in (tmp_path / "windows" / "tensorboard").iterdir())
  assert b"train/loss" in events and b"data_checksum" not in events


def test_gin_files_resolve_from_any_directory(tmp_path, env):
  """`configs/runs/demo.gin` and the includes of a gin file outside the repository resolve from another working
  directory (gin died with a TypeError from its package-path reader)."""
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "base.gin").write_text("TRAIN_STEPS = 2\n")
  (tmp_path / "my_run.gin").write_text("include 'configs/runs/demo.gin'\ninclude 'mine/base.gin'\n")
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  for gin_file in ("configs/runs/demo.gin", str(tmp_path / "my_run.gin")):
    workdir = tmp_path / f"wd{len(os.listdir(tmp_path))}"
    args = [a for a in TINY if not a.startswith("--gin.TRAIN_STEPS")]
    cwd = elsewhere if gin_file.startswith("configs") else tmp_path  # mine/base.gin is relative to the user's cwd
    r = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), f"--gin_file={gin_file}",
                        f"--workdir={workdir}", *args, "--gin.run.sample_prompts=[]"]
                       + (["--gin.TRAIN_STEPS=1"] if gin_file.startswith("configs") else []),
                       cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(_metrics(workdir)) == ([1] if gin_file.startswith("configs") else [1, 2])


def test_data_error_on_a_fresh_workdir_is_one_line(reference, tmp_path, env):
  """A record the objective cannot read is named by file:line, with no orbax thread traceback after it (the
  checkpoint manager was made before the data was checked, and left open)."""
  (tmp_path / "bad.jsonl").write_text('{"inputs": "a b"}\n')
  r = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--gin_file=configs/runs/finetune_seq2seq.gin",
                      f"--workdir={tmp_path / 'wd'}", f"--gin.run.files=['{tmp_path / 'bad.jsonl'}']",
                      f"--gin.run.tokenizer_dir='{reference[0]}'"], cwd=REPO, env=env, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 2, r.stderr[-2000:]
  assert f'{tmp_path / "bad.jsonl"}:1: no "targets" field' in r.stderr
  assert "Traceback" not in r.stderr and "ERROR:absl" not in r.stderr, r.stderr[-3000:]
  assert not any((tmp_path / "wd").iterdir())


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


def _gemma_corpus(tmp_path, vocab_size: int = 60):
  """A text corpus of 300 lines and a Gemma-layout sentencepiece model trained on it: (corpus.txt, tokenizer dir)."""
  words = "the quick brown fox jumps over a lazy dog data model token text".split()
  rng = np.random.default_rng(0)
  lines = [" ".join(rng.choice(words, rng.integers(3, 12))) for _ in range(300)]
  (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n")
  tok_dir = tmp_path / "tok"
  tok_dir.mkdir()
  (tok_dir / "tokenizer.model").write_bytes(_sentencepiece(lines, vocab_size, "bpe"))
  return tmp_path / "corpus.txt", tok_dir


def _sentencepiece(lines, vocab_size: int, model_type: str) -> bytes:
  """bpe: Gemma's layout (<pad> 0, <eos> 1, <bos> 2, <unk> 3); unigram: T5's (<pad> 0, </s> 1, <unk> 2, no BOS)."""
  model = io.BytesIO()
  ids = (dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
              unk_piece="<unk>") if model_type == "bpe" else dict(pad_id=0, eos_id=1, unk_id=2, bos_id=-1))
  spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, minloglevel=2,
                                 vocab_size=vocab_size, model_type=model_type, **ids)
  return model.getvalue()


GEMMA_TINY = ["--gin.TRAIN_STEPS=2", "--gin.SAVE_EVERY=1", "--gin.BATCH_SIZE=2", "--gin.train.log_every=1",
              "--gin.GemmaConfig.vocab_size=128", "--gin.GemmaConfig.d_model=32", "--gin.GemmaConfig.d_ff=64",
              "--gin.GemmaConfig.num_layers=2", "--gin.GemmaConfig.num_heads=2", "--gin.GemmaConfig.num_kv_heads=1",
              "--gin.GemmaConfig.head_dim=16", "--gin.GemmaConfig.query_pre_attn_scalar=16",
              "--gin.GemmaConfig.sliding_window=8", "--gin.GemmaConfig.sliding_pattern=2", "--gin.DataConfig.length=32",
              "--gin.run.sample_prompts=['the quick', 'a lazy dog jumps over the brown fox']",
              "--gin.run.sample_max_new_tokens=3"]


def test_gemma_lm_run_on_files_resumes_refuses_another_model_and_exports(tmp_path, env):
  """configs/runs/gemma_lm.gin end to end on a text file (it crashed at step 1 on GemmaConfig.dropout_rate):
  the workdir carries the tokenizer, a rerun with another model is refused, and the converter exports it."""
  corpus, tok_dir = _gemma_corpus(tmp_path)
  lines = corpus.read_text().splitlines()
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
  # Sample prompts of unequal length are left-padded for a decoder-only model (right padding put pad tokens
  # between the shorter prompt and its continuation): each equals its prompt generated alone.
  for sample in map(json.loads, open(workdir / "samples.jsonl")):
    alone = loaded.generate(np.array([loaded.tokenizer.encode(sample["prompt"])]), max_new_tokens=3)[0]
    assert sample["output"] == loaded.tokenizer.decode(alone.tolist(), skip_special_tokens=False) \
        .replace("<pad>", "").strip(), sample

  # Refused runs leave the workdir byte for byte as it was: another activation; the T5 fine-tuning config (it used
  # to copy T5's tokenizer over Gemma's before refusing); a resume naming another tokenizer; a run while one holds it.
  before = _snapshot(workdir)
  r = subprocess.run(cmd + ["--gin.TRAIN_STEPS=3", "--gin.GemmaConfig.mlp_activation='gelu'"], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 2 and "holds a run of another model (mlp_activation: 'gelu_tanh' -> 'gelu')" in r.stderr, \
      r.stderr[-2000:]
  assert _snapshot(workdir) == before
  t5_tok = tmp_path / "t5tok"
  t5_tok.mkdir()
  (t5_tok / "spiece.model").write_bytes(_sentencepiece(lines, 40, "unigram"))
  (tmp_path / "pairs.jsonl").write_text('{"inputs": "the quick", "targets": "brown fox"}\n' * 8)
  r = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--gin_file=configs/runs/finetune_seq2seq.gin",
                      f"--workdir={workdir}", f"--gin.run.files=['{tmp_path / 'pairs.jsonl'}']",
                      f"--gin.run.tokenizer_dir='{t5_tok}'"], cwd=REPO, env=env, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 2 and "holds a run of another model" in r.stderr, r.stderr[-2000:]
  assert _snapshot(workdir) == before
  other_tok = tmp_path / "othertok"
  other_tok.mkdir()
  (other_tok / "tokenizer.model").write_bytes(_sentencepiece(lines, 58, "bpe"))
  r = subprocess.run([a if not a.startswith("--gin.run.tokenizer_dir") else f"--gin.run.tokenizer_dir='{other_tok}'"
                      for a in cmd] + ["--gin.TRAIN_STEPS=3"], cwd=REPO, env=env, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 2, r.stderr[-2000:]
  assert f"{workdir} was trained with another tokenizer (tokenizer.model differ" in r.stderr, r.stderr[-2000:]
  assert _snapshot(workdir) == before
  with open(workdir / "train.lock", "a") as held:  # as a live run holds it
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    r = subprocess.run(cmd + ["--gin.TRAIN_STEPS=3"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 2 and f"{workdir} is in use by another train.py run" in r.stderr, r.stderr[-2000:]
  assert _snapshot(workdir) == before
  with open(tmp_path / "corpus.txt", "a") as f:
    f.write("a new line of text\n")  # the corpus changed: the resumed run says so
  r = subprocess.run(cmd + ["--gin.TRAIN_STEPS=3"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0 and "resuming from the checkpoint of step 2" in r.stderr, r.stderr[-2000:]
  assert "was trained on another corpus" in r.stderr, r.stderr[-2000:]

  r = subprocess.run([sys.executable, "-m", "t5x_lite.convert", "--to-hf", str(workdir), "--out", str(tmp_path / "hf")],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert (tmp_path / "hf" / "model.safetensors").exists() and (tmp_path / "hf" / "tokenizer.model").exists()


CONTINUED_LM_GIN = """
run.corpus = "files"
run.tokenizer_family = "gemma"
train.model = @GemmaConfig()
train.data = @DataConfig()
train.train_steps = 2
train.save_every = 1
train.log_every = 1
train.optimizer = "adamw"
train.schedule = "cosine"
GemmaConfig.dtype = "float32"
DataConfig.objective = "lm"
DataConfig.decoder_only = True
DataConfig.batch_size = 2
DataConfig.length = 32
DataConfig.start_id = 2
"""


def test_fine_tuning_takes_the_checkpoints_config(tmp_path, env):
  """init_params_from a Gemma 3 checkpoint with an 8-token window, query scale 16 and layer types [s, s, full]:
  gemma_lm.gin's 270m shape restated to the tiny sizes is refused naming every field that differs (it trained as
  512 / 256 / all-sliding, silently); a config that binds no shape trains and exports the checkpoint's model."""
  import transformers as tf  # pylint: disable=import-outside-toplevel
  from conftest import build_hf  # pylint: disable=import-outside-toplevel
  layer_types = ["sliding_attention", "sliding_attention", "full_attention"]
  hf_dir = tmp_path / "hf"
  build_hf(tf.Gemma3ForCausalLM, tf.Gemma3TextConfig(
      vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
      num_key_value_heads=1, head_dim=16, sliding_window=8, query_pre_attn_scalar=16, layer_types=layer_types,
      max_position_embeddings=128), hf_dir)
  corpus, tok_dir = _gemma_corpus(tmp_path)
  files = [f"--gin.run.files=['{corpus}']", f"--gin.run.tokenizer_dir='{tok_dir}'",
           f"--gin.train.init_params_from='{hf_dir}'"]
  restated = ["--gin.GemmaConfig.vocab_size=128", "--gin.GemmaConfig.d_model=32", "--gin.GemmaConfig.d_ff=64",
              "--gin.GemmaConfig.num_layers=3", "--gin.GemmaConfig.num_heads=2", "--gin.GemmaConfig.head_dim=16",
              "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=2", "--gin.DataConfig.length=32"]
  refused = tmp_path / "refused"
  r = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--gin_file=configs/runs/gemma_lm.gin",
                      f"--workdir={refused}", *files, *restated], cwd=REPO, env=env, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 2, r.stderr[-2000:]
  assert ("the run configures 2 field(s) otherwise (sliding_window: 512 configured, 8 in the checkpoint; "
          "query_pre_attn_scalar: 256 configured, 16 in the checkpoint)") in r.stderr, r.stderr[-2000:]
  assert not any(refused.iterdir())

  (tmp_path / "continued.gin").write_text(CONTINUED_LM_GIN)
  workdir = tmp_path / "continued"
  r = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), f"--gin_file={tmp_path / 'continued.gin'}",
                      f"--workdir={workdir}", *files], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"starting at step 0 from {hf_dir}" in r.stderr
  trained = t5x_lite.load(str(workdir), progress=False).config
  assert (trained.sliding_window, trained.query_pre_attn_scalar, trained.layer_types) == (8, 16, tuple(layer_types))
  r = subprocess.run([sys.executable, "-m", "t5x_lite.convert", "--to-hf", str(workdir), "--out",
                      str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  exported = json.loads((tmp_path / "out" / "config.json").read_text())
  assert (exported["sliding_window"], exported["query_pre_attn_scalar"], exported["layer_types"]) == (8, 16,
                                                                                                      layer_types)
