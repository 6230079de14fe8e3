"""train.py with T5Gemma 2: fine-tuning a tiny transformers checkpoint on a toy mapping (reverse 3-5 words) learns
it, measured as held-out exact match through infer.py before and after; UL2 continued pretraining runs and its
workdir loads and generates."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm
import torch
import transformers as tf
from test_t5gemma2_parity import tiny_config

import t5x_lite

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "apple river stone cloud green table music light north paper silver window".split()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  cache = tmp_path_factory.mktemp("jax_cache")
  return {**os.environ, "PYTHONPATH": REPO, "JAX_COMPILATION_CACHE_DIR": str(cache),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A random tiny T5Gemma 2 with a word-level Gemma-layout tokenizer (<pad> 0, <eos> 1, <bos> 2, <unk> 3)."""
  d = tmp_path_factory.mktemp("base")
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter([" ".join(WORDS)] * 50), model_writer=model, minloglevel=2,
                                 vocab_size=len(WORDS) + 4, model_type="word", pad_id=0, eos_id=1, bos_id=2, unk_id=3,
                                 pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>")
  (d / "tokenizer.model").write_bytes(model.getvalue())
  torch.manual_seed(0)
  tf.T5Gemma2ForConditionalGeneration(tiny_config()).save_pretrained(str(d))
  return d


def _reversals(n, seed):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    words = list(rng.choice(WORDS, rng.integers(3, 6)))
    out.append({"inputs": " ".join(words), "targets": " ".join(reversed(words))})
  return out


def _exact_match(model_dir, held, tmp_path, env) -> int:
  inputs, outputs = tmp_path / "held.jsonl", tmp_path / f"out-{os.path.basename(model_dir)}.jsonl"
  inputs.write_text("".join(json.dumps({"inputs": h["inputs"]}) + "\n" for h in held))
  r = subprocess.run([sys.executable, os.path.join(REPO, "infer.py"), "--model", str(model_dir), "--input", str(inputs),
                      "--output", str(outputs), "--max-new-tokens", "10", "--batch-size", "32"], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  answers = [json.loads(line)["output"].strip() for line in outputs.read_text().splitlines()]
  return sum(a == h["targets"] for a, h in zip(answers, held))


def test_fine_tuning_learns_a_toy_mapping(base, tmp_path, env):
  (tmp_path / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in _reversals(2000, 0)))
  held = _reversals(32, 1)
  before = _exact_match(base, held, tmp_path, env)
  workdir = tmp_path / "ft"
  r = subprocess.run([sys.executable, os.path.join(REPO, "train.py"),
                      "--gin_file=configs/runs/finetune_t5gemma2.gin", f"--workdir={workdir}",
                      f"--gin.run.files=['{tmp_path / 'train.jsonl'}']", f"--gin.run.tokenizer_dir='{base}'",
                      f"--gin.train.init_params_from='{base}'", "--gin.TRAIN_STEPS=1000", "--gin.SAVE_EVERY=1000",
                      "--gin.cosine_schedule.peak_learning_rate=1e-2", "--gin.cosine_schedule.warmup_steps=20",
                      "--gin.DataConfig.inputs_length=16", "--gin.DataConfig.targets_length=16",
                      "--gin.train.log_every=100", "--gin.train.progress=False"],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  after = _exact_match(workdir, held, tmp_path, env)
  print(f"held-out exact match: {before}/32 before, {after}/32 after fine-tuning")
  assert before <= 1 and after >= 16, (before, after)
  losses = [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert losses[-1] < 0.5 * losses[0]


def test_ul2_continued_pretraining(base, tmp_path, env):
  rng = np.random.default_rng(2)
  (tmp_path / "corpus.txt").write_text("".join(" ".join(rng.choice(WORDS, rng.integers(8, 20))) + "\n"
                                               for _ in range(200)))
  workdir = tmp_path / "ul2"
  r = subprocess.run([sys.executable, os.path.join(REPO, "train.py"),
                      "--gin_file=configs/runs/pretrain_ul2_t5gemma2.gin", f"--workdir={workdir}",
                      f"--gin.run.files=['{tmp_path / 'corpus.txt'}']", f"--gin.run.tokenizer_dir='{base}'",
                      f"--gin.train.init_params_from='{base}'",
                      "--gin.FIRST_SENTINEL=199", "--gin.NUM_SENTINELS=100", "--gin.MODE_IDS=((200,), (201,), (202,))",
                      "--gin.TRAIN_STEPS=4", "--gin.SAVE_EVERY=2", "--gin.BATCH_SIZE=4",
                      "--gin.T5Gemma2Config.dtype='float32'", "--gin.DataConfig.inputs_length=32",
                      "--gin.DataConfig.targets_length=32", "--gin.rsqrt_schedule.warmup_steps=10",
                      "--gin.train.log_every=1", "--gin.train.progress=False"],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in metrics] == [1, 2, 3, 4] and all(np.isfinite(m["loss"]) for m in metrics)
  model = t5x_lite.load(str(workdir), progress=False)
  assert model.config.family == "t5gemma2" and model.tokenizer is not None
  out = model.generate(np.array([model.tokenizer.encode("apple river <eos>")]), max_new_tokens=4)
  assert out.shape == (1, 4)
