"""Fine-tuning with `train(init_params_from=...)`: the run starts from the transformers checkpoint's weights,
and a restart resumes from the run's own checkpoint without reading the base checkpoint again (it may be gone),
ending where an uninterrupted run ends. Sharded over data and fsdp, with Adafactor's factored moments."""

import shutil

import jax
import numpy as np
import pytest
import transformers as tf
from conftest import T5_TINY, build_hf

import t5x_lite
from t5x_lite.data.pipeline import DataConfig
from t5x_lite.training.loop import train


class CharTokenizer:
  """Characters to ids 3..127 (the tiny model's vocabulary); enough for the seq2seq pipeline."""
  eos_id = 1

  def encode(self, text):
    return [3 + ord(c) % 125 for c in text]


DOCUMENTS = [{"inputs": f"question {i}: what is {i} plus {i}?", "targets": f"{2 * i}"} for i in range(64)]


def test_finetune_starts_from_checkpoint_and_resumes_without_it(tmp_path):
  base = tmp_path / "hf"
  build_hf(tf.T5ForConditionalGeneration, tf.T5Config(**T5_TINY), base)
  base_model = t5x_lite.load(str(base), progress=False)
  hf_params, config = base_model.params, base_model.config

  def run(workdir, steps):
    data = DataConfig(objective="seq2seq", batch_size=8, inputs_length=32, targets_length=8, prefetch=0)
    # cosine_schedule's defaults: the learning rate is 0 at the first step (warmup from 0), tiny after it.
    return train(str(workdir), model=config, data=data, tokenizer=CharTokenizer(), documents=DOCUMENTS,
                 train_steps=steps, save_every=1, log_every=1, mesh_spec="data:2,fsdp:4", optimizer="adafactor",
                 schedule="cosine", init_params_from=str(base), async_checkpoints=False, progress=False)

  uninterrupted = run(tmp_path / "a", 3)
  first = run(tmp_path / "b", 1)
  step1 = t5x_lite.load(str(tmp_path / "b"), progress=False).params
  for ours, ref in zip(jax.tree.leaves(step1), jax.tree.leaves(hf_params)):
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))  # a zero-learning-rate step from HF's weights

  shutil.rmtree(base)  # a restart must not need the base checkpoint
  resumed = run(tmp_path / "b", 3)
  assert resumed["loss"] == uninterrupted["loss"] and first["loss"] > 0
  a = t5x_lite.load(str(tmp_path / "a"), progress=False).params
  b = t5x_lite.load(str(tmp_path / "b"), progress=False).params
  moved = 0.0
  for x, y, ref in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(hf_params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    moved = max(moved, float(np.abs(np.asarray(x) - np.asarray(ref)).max()))
  assert moved > 0  # steps 2 and 3 did train


def test_finetune_config_comes_from_the_checkpoint_and_other_models_are_refused(tmp_path):
  """The base checkpoint's config is the model: settings of how it computes may change (dropout here), a model
  that differs is refused with every differing field listed, before anything is written."""
  base = tmp_path / "hf"
  build_hf(tf.T5ForConditionalGeneration, tf.T5Config(**T5_TINY), base)
  config = t5x_lite.load(str(base), progress=False).config
  data = DataConfig(objective="seq2seq", batch_size=8, inputs_length=32, targets_length=8)
  run = tmp_path / "run"
  with pytest.raises(ValueError) as refused:
    train(str(run), model=config.replace(d_ff=48, num_heads=2, head_dim=16, dropout_rate=0.3), data=data,
          tokenizer=CharTokenizer(), documents=DOCUMENTS, train_steps=1, init_params_from=str(base),
          async_checkpoints=False, progress=False)
  message = str(refused.value)
  assert "configures 3 field(s) otherwise" in message and "d_ff: 48 configured, 64 in the checkpoint" in message
  assert "num_heads: 2 configured, 4" in message and "head_dim: 16 configured, 8" in message
  assert "dropout_rate" not in message.split("(only")[0] and not run.exists()

  # A config of another family: named, nothing written either.
  from t5x_lite.config import GemmaConfig  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match="holds a t5 model .* but the run configures a GemmaConfig"):
    train(str(run), model=GemmaConfig(), data=data, tokenizer=CharTokenizer(), documents=DOCUMENTS, train_steps=1,
          init_params_from=str(base), async_checkpoints=False, progress=False)
  assert not run.exists()

  # Only a changeable setting differs: the run trains the checkpoint's model with it.
  train(str(run), model=config.replace(dropout_rate=0.3), data=data, tokenizer=CharTokenizer(), documents=DOCUMENTS,
        train_steps=1, init_params_from=str(base), async_checkpoints=False, progress=False)
  trained = t5x_lite.load(str(run), progress=False).config
  assert trained == config.replace(dropout_rate=0.3)
