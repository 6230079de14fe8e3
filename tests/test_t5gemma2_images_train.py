"""Training T5Gemma 2 on image+text records: the data pipeline packs each example's images with it and resumes
exactly; train.py with configs/runs/finetune_t5gemma2_images.gin teaches the tiny model to name the colour of an
image (held-out accuracy through infer.py before and after) while the frozen SigLIP tower keeps its weights."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import PIL.Image
import pytest
from vision_fixtures import build_t5gemma2_vision_dir

import t5x_lite
from t5x_lite import data
from t5x_lite.vision import Processor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
PROMPT = "What a picture <start_of_image>"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  path, _ = build_t5gemma2_vision_dir(tmp_path_factory.mktemp("base"))
  return path


def _colour_records(folder, n, seed, noise=40):
  """n records {"inputs", "images", "targets"}: a PNG of one of three colours (with per-pixel noise, random size
  and aspect ratio) and its colour's name; image paths relative to `folder`, where the JSONL goes."""
  rng = np.random.default_rng(seed)
  (folder / f"images{seed}").mkdir(exist_ok=True)
  records = []
  for i in range(n):
    name = list(COLOURS)[rng.integers(3)]
    h, w = rng.integers(16, 64, 2)
    pixels = np.array(COLOURS[name]) + (rng.integers(-noise, noise, (h, w, 3)) if noise else np.zeros((h, w, 3)))
    PIL.Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"images{seed}" / f"{i}.png")
    records.append({"inputs": PROMPT, "images": [f"images{seed}/{i}.png"], "targets": name})
  return records


def _write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_image_batches_keep_each_row_s_images_in_order_and_resume(base, tmp_path):
  """Packed rows of image records and text-only records: each row holds as many images as its image tokens ask
  for, in the order of its segments (checked by colour against each segment's target), zeros after; a restored
  iterator continues with exactly the batches (pixels included) the first one would have made."""
  records = _colour_records(tmp_path, 12, 0, noise=0)
  records += [{"inputs": "What a cat sat on", "targets": "mat"}] * 4
  _write_jsonl(tmp_path / "train.jsonl", records)
  processor = Processor.from_dir(base)
  config = data.DataConfig(objective="seq2seq", batch_size=2, inputs_length=64, targets_length=8, max_images=2,
                           start_id=2, seed=3)
  docs = data.read_documents([str(tmp_path / "train.jsonl")])
  it = data.make_batches(config, processor.tokenizer, documents=docs, processor=processor, process_index=0,
                         process_count=1)
  batches = [next(it) for _ in range(6)]
  state = it.get_state()
  ahead = [next(it) for _ in range(3)]
  for b in batches:
    assert b["pixel_values"].shape == (2, 2, 3, 32, 32)
    for row in range(2):
      images = np.count_nonzero(b["input_ids"][row] == processor.image_token_id) // 16
      assert not b["pixel_values"][row, images:].any()
      segments_with_images = [s for s in np.unique(b["encoder_segment_ids"][row]) if s and np.any(
          (b["encoder_segment_ids"][row] == s) & (b["input_ids"][row] == processor.image_token_id))]
      assert len(segments_with_images) == images
      for slot, s in enumerate(segments_with_images):
        target = b["decoder_target_ids"][row][b["decoder_segment_ids"][row] == s]
        colour = processor.tokenizer.decode(target.tolist()).strip()
        want = (np.array(COLOURS[colour]) / 255 - 0.5) / 0.5  # rescale 1/255, mean = std = 0.5
        np.testing.assert_allclose(b["pixel_values"][row, slot].mean(axis=(1, 2)), want, atol=1e-5)
  assert sum(np.count_nonzero(b["input_ids"] == processor.image_token_id) for b in batches) > 16 * 6
  resumed = data.make_batches(config, processor.tokenizer, documents=docs, processor=processor, process_index=0,
                              process_count=1)
  resumed.set_state(state)
  for want in ahead:
    got = next(resumed)
    assert sorted(got) == sorted(want)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_image_records_are_checked_by_file_and_line(base, tmp_path):
  processor = Processor.from_dir(base)
  config = data.DataConfig(objective="seq2seq", batch_size=2, inputs_length=64, targets_length=8, max_images=2,
                           start_id=2)
  good = _colour_records(tmp_path, 2, 0)
  cases = [({**good[0], "images": []}, r"train.jsonl:2: \"inputs\" holds 1 <start_of_image> but \"images\" lists 0"),
           ({**good[0], "images": ["images0/none.png"]}, r"train.jsonl:2: image file .*images0/none.png does not exist"),
           ({**good[0], "images": "images0/0.png"}, r"train.jsonl:2: \"images\" must be a list of file paths")]
  for record, message in cases:
    _write_jsonl(tmp_path / "train.jsonl", [good[1], record])
    with pytest.raises(ValueError, match=message):
      data.make_batches(config, processor.tokenizer, documents=data.read_documents([str(tmp_path / "train.jsonl")]),
                        processor=processor, process_index=0, process_count=1)
  _write_jsonl(tmp_path / "train.jsonl", good)
  text_only = data.DataConfig(objective="seq2seq", batch_size=2, inputs_length=64, targets_length=8, start_id=2)
  with pytest.raises(ValueError, match="train.jsonl:1: \"images\" given, but DataConfig.max_images is 0"):
    data.make_batches(text_only, processor.tokenizer, documents=data.read_documents([str(tmp_path / "train.jsonl")]),
                      process_index=0, process_count=1)
  short = data.DataConfig(objective="seq2seq", batch_size=1, inputs_length=12, targets_length=8, max_images=2,
                          start_id=2)
  it = data.make_batches(short, processor.tokenizer, documents=data.read_documents([str(tmp_path / "train.jsonl")]),
                         processor=processor, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="over DataConfig.inputs_length 12: its image tokens cannot be cut"):
    next(it)


def _accuracy(model_dir, held, tmp_path, env) -> int:
  inputs, outputs = tmp_path / "held.jsonl", tmp_path / f"out-{os.path.basename(model_dir)}.jsonl"
  _write_jsonl(inputs, [{"text": h["inputs"], "images": h["images"]} for h in held])
  r = subprocess.run([sys.executable, os.path.join(REPO, "infer.py"), "--model", str(model_dir), "--input",
                      str(inputs), "--output", str(outputs), "--max-new-tokens", "6", "--batch-size", "32"],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  answers = [json.loads(line)["output"].strip() for line in outputs.read_text().splitlines()]
  return sum(a == h["targets"] for a, h in zip(answers, held))


def test_fine_tuning_names_the_colour_of_an_image(base, tmp_path):
  _write_jsonl(tmp_path / "train.jsonl", _colour_records(tmp_path, 300, 0))
  held = _colour_records(tmp_path, 30, 1)
  env = {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  before = _accuracy(base, held, tmp_path, env)
  workdir = tmp_path / "ft"
  r = subprocess.run([sys.executable, os.path.join(REPO, "train.py"),
                      "--gin_file=configs/runs/finetune_t5gemma2_images.gin", f"--workdir={workdir}",
                      f"--gin.run.files=['{tmp_path / 'train.jsonl'}']", f"--gin.run.tokenizer_dir='{base}'",
                      f"--gin.train.init_params_from='{base}'", "--gin.TRAIN_STEPS=200", "--gin.SAVE_EVERY=200",
                      "--gin.BATCH_SIZE=16", "--gin.cosine_schedule.peak_learning_rate=1e-2",
                      "--gin.cosine_schedule.warmup_steps=20", "--gin.DataConfig.inputs_length=32",
                      "--gin.DataConfig.targets_length=8", "--gin.train.log_every=20", "--gin.train.progress=False"],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  after = _accuracy(workdir, held, tmp_path, env)
  print(f"held-out colour accuracy: {before}/30 before, {after}/30 after fine-tuning")
  assert before <= 3 and after >= 27, (before, after)
  start, end = t5x_lite.load(base, progress=False).params, t5x_lite.load(str(workdir), progress=False).params
  for name in start:  # train.frozen = ["vision"] in the config
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(start[name]), jax.tree.leaves(end[name])))
    assert same == (name == "vision"), name
