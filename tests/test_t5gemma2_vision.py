"""T5Gemma 2 with images against transformers' own, on the tiny model of test_t5gemma2_parity.py (SigLIP: 32 px in
patches of 4, an 8 x 8 grid pooled to 16 tokens per image; encoder window 4, far shorter than an image): logits,
encoder states, greedy, beam and scores with rows of different image counts and encoder padding; photographs
through both processors into both models; the image-token checks; Hub-format tensor names; sharded == unsharded
with the vision tower sharded; infer.py on a file mixing image, broken-image and text lines."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import PIL.Image
import pytest
import torch
import transformers as tf
from conftest import assert_close_to_hf, build_hf
from safetensors.numpy import load_file, save_file
from test_t5gemma2_parity import tiny_config
from vision_fixtures import build_t5gemma2_vision_dir

cbook = pytest.importorskip("matplotlib.cbook")

import t5x_lite

BOI, EOI, IMAGE, TOKENS = 255, 256, 257, 16
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTOS = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png")


@pytest.fixture(scope="module")
def vision_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("t5gemma2_vision")
  hf = build_hf(tf.T5Gemma2ForConditionalGeneration, tiny_config(), d)
  return str(d), hf


def _row(parts, length, rng):
  """Ids and mask of one prompt: ints are runs of random text tokens, "image" an image as the processor lays it
  out (boi, 16 image tokens, eoi); padded to `length`."""
  ids = []
  for part in parts:
    ids += [BOI] + [IMAGE] * TOKENS + [EOI] if part == "image" else list(rng.integers(3, 250, part))
  return ids + [0] * (length - len(ids)), [1] * len(ids) + [0] * (length - len(ids))


def _inputs(seed=0):
  """Row 0: two images between text; row 1: one image, then padding. Pixels: 3 random normalised images."""
  rng = np.random.default_rng(seed)
  rows = [_row([3, "image", 4, "image", 2], 50, rng), _row([5, "image", 6], 50, rng)]
  ids, mask = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
  pixels = rng.uniform(-1, 1, (3, 3, 32, 32)).astype(np.float32)
  return ids, mask, pixels, rng.integers(3, 250, (2, 6))


def _t(x):
  return torch.tensor(np.asarray(x))


def test_logits_and_encoder_states_match(vision_dir):
  path, hf = vision_dir
  ids, mask, pixels, dec = _inputs()
  model = t5x_lite.load(path, progress=False)
  with torch.no_grad():
    ref = hf(input_ids=_t(ids), attention_mask=_t(mask), pixel_values=_t(pixels), decoder_input_ids=_t(dec)).logits
    text_only = hf(input_ids=_t(ids), attention_mask=_t(mask), decoder_input_ids=_t(dec)).logits
    enc = hf.get_encoder()(input_ids=_t(ids), attention_mask=_t(mask), pixel_values=_t(pixels)).last_hidden_state
  assert float((ref - text_only).abs().max()) > 0.1  # the images matter to these logits
  assert_close_to_hf(model.logits(ids, mask, dec, pixel_values=pixels), ref.numpy())
  real = mask.astype(bool)
  assert_close_to_hf(model.encode(ids, mask, pixel_values=pixels)[real], enc.numpy()[real])


def test_greedy_beam_and_score_match(vision_dir):
  path, hf = vision_dir
  ids, mask, pixels, _ = _inputs(1)
  model = t5x_lite.load(path, progress=False)
  kw = dict(input_ids=_t(ids), attention_mask=_t(mask), pixel_values=_t(pixels), max_new_tokens=10, do_sample=False)
  with torch.no_grad():
    greedy, beam = hf.generate(**kw).numpy(), hf.generate(**kw, num_beams=3).numpy()
  np.testing.assert_array_equal(model.generate(ids, mask, pixels, max_new_tokens=10), greedy[:, 1:])
  ours_beam = model.generate(ids, mask, pixels, max_new_tokens=10, method="beam", num_beams=3)
  np.testing.assert_array_equal(ours_beam[:, :beam.shape[1] - 1], beam[:, 1:])
  targets = greedy[:, 1:6]
  with torch.no_grad():
    logits = hf(input_ids=_t(ids), attention_mask=_t(mask), pixel_values=_t(pixels), labels=_t(targets)).logits
  ref = torch.log_softmax(logits.float(), -1).gather(-1, _t(targets)[..., None])[..., 0].sum(-1).numpy()
  np.testing.assert_allclose(model.score(ids, targets, mask, pixel_values=pixels), ref, rtol=1e-5, atol=1e-4)
  sample = dict(max_new_tokens=10, method="sample", temperature=2.0, seed=7)
  drawn = model.generate(ids, mask, pixels, **sample)
  np.testing.assert_array_equal(model.generate(ids, mask, pixels, **sample), drawn)  # the seed decides
  assert not np.array_equal(model.generate(ids, mask, pixels[::-1], **sample), drawn)  # and so do the images


def test_image_token_and_pixel_mistakes_are_named(vision_dir):
  path, _ = vision_dir
  ids, mask, pixels, dec = _inputs()
  model = t5x_lite.load(path, progress=False)
  with pytest.raises(ValueError, match=r"ask for 3 images \(per row: \[2, 1\]\), but pixel_values holds 2"):
    model.logits(ids, mask, dec, pixel_values=pixels[:2])
  cut = ids.copy()
  cut[1, 8] = 7  # one image token of row 1 (after 5 text tokens and boi) overwritten: 15 left
  with pytest.raises(ValueError, match="row 1 of input_ids holds 15 image tokens"):
    model.generate(cut, mask, pixels, max_new_tokens=2)
  with pytest.raises(ValueError, match=r"pixel_values must be \(images, 3, 32, 32\).*got shape \(3, 3, 16, 16\)"):
    model.encode(ids, mask, pixel_values=pixels[:, :, :16, :16])


def test_hub_tensor_names_load_the_same(vision_dir, tmp_path):
  """Hub files name the tower `vision_tower.vision_model.*`; a model built from a config saves it without
  `vision_model.`. Both load to the same weights, and export writes the name it read."""
  path, _ = vision_dir
  tensors = load_file(f"{path}/model.safetensors")
  prefix = "model.encoder.vision_tower."
  renamed = {prefix + "vision_model." + k[len(prefix):] if k.startswith(prefix) else k: v for k, v in tensors.items()}
  assert sum(k.startswith(prefix + "vision_model.") for k in renamed) == 5 + 16 * 2
  for name in ("config.json",):
    (tmp_path / name).write_bytes(open(f"{path}/{name}", "rb").read())
  save_file(renamed, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  ids, mask, pixels, dec = _inputs()
  want = t5x_lite.load(path, progress=False).logits(ids, mask, dec, pixel_values=pixels)
  np.testing.assert_array_equal(t5x_lite.load(str(tmp_path), progress=False).logits(ids, mask, dec,
                                                                                    pixel_values=pixels), want)


def test_vision_tensor_mistakes_are_named(vision_dir, tmp_path):
  """A file missing a tower tensor, or holding one of the wrong shape, is refused naming that tensor."""
  path, _ = vision_dir
  tensors = load_file(f"{path}/model.safetensors")
  fc1 = "model.encoder.vision_tower.encoder.layers.1.mlp.fc1.weight"
  proj = "model.encoder.multi_modal_projector.mm_input_projection_weight"
  for name, change in ((fc1, None), (proj, tensors[proj].T.copy())):
    broken = {k: v for k, v in tensors.items() if k != name}
    if change is not None:
      broken[name] = change
    (tmp_path / "config.json").write_bytes(open(f"{path}/config.json", "rb").read())
    save_file(broken, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(t5x_lite.ConversionError, match=name.replace(".", r"\.")):
      t5x_lite.load(str(tmp_path), progress=False)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (XLA_FLAGS host device count)")
@pytest.mark.parametrize("spec", ["data:2,fsdp:2,tensor:2", "fsdp:4,tensor:2", "data:8"])
def test_sharded_equals_unsharded(vision_dir, spec):
  """The tower's width (24) and MLP (48) split over fsdp and tensor; images follow their rows over data."""
  path, _ = vision_dir
  ids, mask, pixels, dec = _inputs()
  ids, mask, dec = (np.concatenate([x, x[::-1]]) for x in (ids, mask, dec))
  pixels = np.concatenate([pixels, pixels[2:], pixels[:2]])  # row order reversed: row 2 holds 1 image, row 3 two
  single = t5x_lite.load(path, progress=False)
  sharded = t5x_lite.load(path, mesh=t5x_lite.make_mesh(spec), progress=False)
  kernel = sharded.params["vision"]["layers"]["mlp"]["fc1"]["kernel"]
  if spec != "data:8":
    assert kernel.addressable_shards[0].data.size < kernel.size  # the tower itself is split
  want = single.logits(ids, mask, dec, pixel_values=pixels)
  np.testing.assert_allclose(sharded.logits(ids, mask, dec, pixel_values=pixels), want, rtol=0,
                             atol=5e-6 * float(np.abs(want).max()))
  np.testing.assert_array_equal(sharded.generate(ids, mask, pixels, max_new_tokens=6),
                                single.generate(ids, mask, pixels, max_new_tokens=6))


@pytest.fixture(scope="module")
def processor_dir(tmp_path_factory):
  """The tiny model with a tokenizer that knows the image tokens and the processor files (vision_fixtures)."""
  return build_t5gemma2_vision_dir(tmp_path_factory.mktemp("t5gemma2_processor"))


def test_photographs_through_processor_and_model_match_transformers(processor_dir):
  """Real photographs and a synthetic greyscale image, two prompts with two and one images, padded: our
  processor's ids and pixels into our model give transformers' processor + model's logits and greedy tokens."""
  path, hf = processor_dir
  photos = [PIL.Image.open(cbook.get_sample_data(name, asfileobj=False)) for name in PHOTOS]
  grey = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 70), np.uint8), mode="L")
  text = ["Describe <start_of_image> and <start_of_image> picture", "What a cat <start_of_image>"]
  images = [photos, [grey]]
  ref = tf.AutoProcessor.from_pretrained(path)(text=text, images=images, padding=True, return_tensors="pt")
  model = t5x_lite.load(path, progress=False)
  ours = model.processor(text=text, images=images, padding=True)
  np.testing.assert_array_equal(ours["input_ids"], ref["input_ids"].numpy())
  np.testing.assert_allclose(ours["pixel_values"], ref["pixel_values"].numpy(), rtol=0, atol=1e-5)
  dec = np.random.default_rng(1).integers(3, 250, (2, 5))
  with torch.no_grad():
    logits = hf(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"], pixel_values=ref["pixel_values"],
                decoder_input_ids=_t(dec)).logits.numpy()
    greedy = hf.generate(**{k: ref[k] for k in ("input_ids", "attention_mask", "pixel_values")}, max_new_tokens=8,
                         do_sample=False).numpy()
  ids, mask, pixels = ours["input_ids"], ours["attention_mask"], ours["pixel_values"]
  assert_close_to_hf(model.logits(ids, mask, dec, pixel_values=pixels), logits)
  np.testing.assert_array_equal(model.generate(ids, mask, pixels, max_new_tokens=8), greedy[:, 1:])


def test_infer_answers_image_lines_and_names_broken_images(processor_dir, tmp_path):
  """One infer.py run over image lines, text-only lines, a missing image, a corrupt one, one that is not an image
  and a count mismatch: every line answered in order; the image lines equal Model.generate on the processor's
  output, the broken ones name their file."""
  path, _ = processor_dir
  photo = cbook.get_sample_data(PHOTOS[0], asfileobj=False)
  (tmp_path / "pics").mkdir()
  PIL.Image.open(photo).save(tmp_path / "pics" / "hopper.png")
  (tmp_path / "pics" / "cut.jpg").write_bytes(open(photo, "rb").read()[:3000])  # a truncated JPEG
  (tmp_path / "pics" / "notes.png").write_text("not an image")
  lines = [{"text": "Describe <start_of_image>", "images": ["pics/hopper.png"]},
           {"text": "What a cat sat on"},
           {"text": "Describe <start_of_image>", "images": ["pics/missing.png"]},
           {"text": "Describe <start_of_image> and <start_of_image>", "images": ["pics/hopper.png", "pics/cut.jpg"]},
           {"text": "Describe <start_of_image>", "images": ["pics/notes.png"]},
           {"text": "Describe <start_of_image> and <start_of_image>", "images": ["pics/hopper.png"]},
           {"text": "<start_of_image> shows a dog", "images": [str(tmp_path / "pics" / "hopper.png")]}]
  (tmp_path / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
  env = {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  r = subprocess.run([sys.executable, os.path.join(REPO, "infer.py"), "--model", path, "--input",
                      str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"), "--max-new-tokens", "6",
                      "--batch-size", "4"], cwd=str(tmp_path.parent), env=env, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
  assert len(out) == len(lines)
  for k in (2, 3, 4, 5):
    assert "error" in out[k] and "output" not in out[k], (k, out[k])
  assert "missing.png" in out[2]["error"] and "cut.jpg" in out[3]["error"] and "notes.png" in out[4]["error"]
  assert "2" in out[5]["error"] and "1" in out[5]["error"]
  model = t5x_lite.load(path, progress=False)
  for k in (0, 1, 6):
    image = [PIL.Image.open(tmp_path / "pics" / "hopper.png")] if "images" in lines[k] else None
    feed = model.processor(text=lines[k]["text"], images=image)
    want = model.generate(feed["input_ids"], feed["attention_mask"], feed.get("pixel_values"), max_new_tokens=6)[0]
    eos = np.flatnonzero(want == model.config.eos_token_id)
    want = want[:eos[0] + 1] if eos.size else want
    assert out[k]["output_ids"] == want.tolist(), k
