"""infer.py end to end: JSONL in, JSONL out in order, per-line errors, kill -9 and resume without duplicates."""

import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import sentencepiece as spm
import transformers as tf
from conftest import T5_TINY, build_hf

import t5x_lite

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CACHE = {}
WORDS = "the quick brown fox jumps over a lazy dog hello world translate summarize question answer".split()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  """A tiny T5 (vocab 140 = 40 pieces + 100 sentinels) with a sentencepiece model trained here."""
  d = tmp_path_factory.mktemp("t5_with_tokenizer")
  _CACHE["dir"] = str(tmp_path_factory.mktemp("jax_cache"))
  rng = np.random.default_rng(0)
  corpus = [" ".join(rng.choice(WORDS, rng.integers(3, 10))) for _ in range(500)]
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=buf, vocab_size=40, pad_id=0,
                                 eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
  (d / "spiece.model").write_bytes(buf.getvalue())
  build_hf(tf.T5ForConditionalGeneration, tf.T5Config(**{**T5_TINY, "vocab_size": 140}), d, seed=5)
  return str(d)


def _infer(*args, **popen):
  cmd = [sys.executable, os.path.join(REPO, "infer.py"), *args]
  # A shared persistent compilation cache: the repeated runs of the resume test skip recompiling.
  env = {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "JAX_COMPILATION_CACHE_DIR": _CACHE["dir"], "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  if popen:
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  return subprocess.run(cmd, env=env, capture_output=True, text=True)


def _read(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_good_and_bad_lines_answered_in_order(model_dir, tmp_path):
  lines = ['{"text": "hello world"}', "not json", '{"input_ids": [5, 6, 7, 1]}', '{"nope": 1}',
           '{"text": ""}', '{"input_ids": [5, 99999]}', '{"text": "the lazy dog jumps"}',
           '{"text": "' + " ".join(["fox"] * 300) + '"}', '[1, 2]', '{"input_ids": "abc"}']
  (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
  r = _infer("--model", model_dir, "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
             "--batch-size", "3", "--max-new-tokens", "6", "--max-input-length", "200", "--mesh", "data:2")
  assert r.returncode == 0, r.stderr
  out = _read(tmp_path / "out.jsonl")
  assert len(out) == len(lines)
  errors = {i: o.get("error", "") for i, o in enumerate(out)}
  assert "invalid JSON" in errors[1]
  assert 'give "text" or "input_ids"' in errors[3]
  assert "empty input" in errors[4]
  assert "99999" in errors[5] and "outside the vocabulary" in errors[5]
  assert "over --max-input-length 200" in errors[7]
  assert "JSON object" in errors[8]
  assert "list of integer ids" in errors[9]
  model = t5x_lite.load(model_dir, progress=False)
  for i, text in ((0, "hello world"), (6, "the lazy dog jumps")):
    ids = model.tokenizer.encode(text)
    want = model.generate(np.array([ids]), max_new_tokens=6)[0]
    eos = np.flatnonzero(want == model.config.eos_token_id)
    want = want[:eos[0] + 1] if eos.size else want
    assert out[i]["output_ids"] == want.tolist()
    assert out[i]["output"] == model.tokenizer.decode(want.tolist())
  assert out[2]["output_ids"] == model.generate(np.array([[5, 6, 7, 1]]), max_new_tokens=6)[0][
      :len(out[2]["output_ids"])].tolist()


def test_score_mode(model_dir, tmp_path):
  lines = ['{"text": "hello world", "target": "the dog"}', '{"text": "hello"}',
           '{"input_ids": [5, 6, 1], "target": [7, 8, 1]}']
  (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
  r = _infer("--model", model_dir, "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
             "--mode", "score")
  assert r.returncode == 0, r.stderr
  out = _read(tmp_path / "out.jsonl")
  model = t5x_lite.load(model_dir, progress=False)
  want = model.score(np.array([model.tokenizer.encode("hello world")]), np.array([model.tokenizer.encode("the dog")]))
  assert out[0]["score"] == pytest.approx(float(want[0]), rel=1e-5)
  assert 'missing field "target"' in out[1]["error"]
  assert out[2]["score"] == pytest.approx(float(model.score(np.array([[5, 6, 1]]), np.array([[7, 8, 1]]))[0]),
                                          rel=1e-5)


def test_killed_run_resumes_without_duplicates(model_dir, tmp_path):
  rng = np.random.default_rng(1)
  lines = [json.dumps({"text": " ".join(rng.choice(WORDS, rng.integers(2, 8)))}) for _ in range(48)]
  lines[17] = "{broken"
  (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
  args = ["--model", model_dir, "--input", str(tmp_path / "in.jsonl"), "--batch-size", "2", "--max-new-tokens", "5"]
  # The uninterrupted reference.
  r = _infer(*args, "--output", str(tmp_path / "ref.jsonl"))
  assert r.returncode == 0, r.stderr
  out = tmp_path / "out.jsonl"
  for kills in range(2):
    proc = _infer(*args, "--output", str(out), popen=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once it has written a few more lines
      if out.exists() and out.read_text().count("\n") >= 6 + 14 * kills:
        break
      time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  written = out.read_text().count("\n")
  assert 0 < written < len(lines), written
  with open(out, "a") as f:
    f.write('{"output_ids": [1, 2')  # a torn line, as a kill mid-write would leave
  r = _infer(*args, "--output", str(out))
  assert r.returncode == 0, r.stderr
  assert f"resumed at line {written}" in r.stderr
  assert out.read_text() == (tmp_path / "ref.jsonl").read_text()
