"""t5x_lite.vision against transformers' AutoProcessor / Gemma 3 image processor (PIL backend) on a tiny T5Gemma 2
directory: pixels, crops, ids, masks, errors, and the processor files on export."""

import json
import os
import types

import numpy as np
import PIL.Image
import pytest

tf = pytest.importorskip("transformers")
cbook = pytest.importorskip("matplotlib.cbook")

from vision_fixtures import BOI, EOI, IMAGE, build_t5gemma2_vision_dir  # noqa: E402

import t5x_lite  # noqa: E402
from t5x_lite.errors import ImageError  # noqa: E402
from t5x_lite.tokenizer import load_tokenizer  # noqa: E402
from t5x_lite.vision import ImageProcessor, ImageTokens, Processor, expand_prompt, load_image  # noqa: E402
from t5x_lite.vision.processor import load_processor  # noqa: E402

PIXEL_TOL = 1e-5
PHOTOS = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png")  # RGB JPEG 512x600; RGBA PNGs


@pytest.fixture(scope="module")
def vision_dir(tmp_path_factory):
  path, _ = build_t5gemma2_vision_dir(tmp_path_factory.mktemp("t5gemma2_vision"))
  return path


@pytest.fixture(scope="module")
def ref(vision_dir):
  return tf.AutoProcessor.from_pretrained(vision_dir)


@pytest.fixture(scope="module")
def ours(vision_dir):
  return Processor.from_dir(vision_dir)


def _photo(name):
  return cbook.get_sample_data(name, asfileobj=False)


def _smooth(h, w, channels, seed):
  """A random image with gradients and noise, so that resampling filters show their differences."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:h, 0:w]
  base = np.stack([(x * (c + 1) * 37 + y * (3 - c) * 23) % 256 for c in range(channels)], -1)
  return np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)


def _pil_cases():
  """(name, PIL image): every mode transformers converts, at sizes from 1x1 to larger than the target, tall and
  wide."""
  cases = []
  for h, w in [(1, 1), (7, 5), (20, 30), (100, 100), (300, 40), (40, 300)]:
    rgb = PIL.Image.fromarray(_smooth(h, w, 3, h * w))
    rgba = PIL.Image.fromarray(_smooth(h, w, 4, h + w))
    cases += [(f"RGB {h}x{w}", rgb), (f"RGBA {h}x{w}", rgba), (f"L {h}x{w}", rgb.convert("L")),
              (f"LA {h}x{w}", rgba.convert("LA")), (f"CMYK {h}x{w}", rgb.convert("CMYK")),
              (f"P {h}x{w}", rgb.convert("P", palette=PIL.Image.Palette.ADAPTIVE, colors=16))]
    p_transparent = rgb.convert("P", palette=PIL.Image.Palette.ADAPTIVE, colors=16)
    p_transparent.info["transparency"] = 3
    cases.append((f"P+transparency {h}x{w}", p_transparent))
  i16 = PIL.Image.fromarray(_smooth(30, 20, 1, 0)[..., 0].astype(np.uint16) * 200)
  assert i16.mode == "I;16"
  cases += [("I;16 30x20", i16), ("1 30x20", PIL.Image.fromarray(_smooth(30, 20, 3, 1)).convert("1"))]
  cases += [(name, PIL.Image.open(_photo(name))) for name in PHOTOS]
  return cases


def _array_cases():
  """(name, uint8 array): (H, W, 3), (H, W, 4) and (H, W, 1) arrays; heights of 1, 3 or 4 are left out, as
  transformers reads those as channels-first."""
  return [(f"array {h}x{w}x{c}", _smooth(h, w, c, h * c + w)) for h, w in [(20, 30), (64, 9), (120, 200)]
          for c in (3, 4, 1)]


def _max_diffs(ours_pixels, ref_pixels, names):
  assert ours_pixels.shape == ref_pixels.shape and ours_pixels.dtype == np.float32
  diffs = np.abs(ours_pixels - ref_pixels).reshape(len(names), -1).max(-1)
  return {name: float(d) for name, d in zip(names, diffs)}


# --- the image tokens of the tiny directory ----------------------------------------------------------------------
def test_fixture_loads_in_transformers_with_the_config_ids(vision_dir, ref, ours):
  assert type(ref).__name__ == "Gemma3Processor"
  assert type(ref.image_processor).__name__ == "Gemma3ImageProcessorPil"  # no torchvision: the PIL backend
  tok = ref.tokenizer
  assert (tok.boi_token_id, tok.eoi_token_id, tok.image_token_id, ref.image_seq_length) == (BOI, EOI, IMAGE, 16)
  assert (ours.boi_token_id, ours.eoi_token_id, ours.image_token_id, ours.image_seq_length) == (BOI, EOI, IMAGE, 16)
  assert ours.image_processor.size == (32, 32) and ours.padding_side == tok.padding_side == "left"


def test_tokenizer_encodes_and_decodes_image_tokens_as_transformers(vision_dir, ref):
  tok = load_tokenizer(vision_dir, "gemma")
  texts = ["Describe <start_of_image> a cat", "x<start_of_image><image_soft_token><end_of_image>y", "", "\n\n",
           "What is in this picture?\n\n<start_of_image>" + "<image_soft_token>" * 3 + "<end_of_image>\n\n ",
           "zz <unk> <bos> <eos><pad>", "Here is the original image  and here are some crops"]
  for text in texts:
    assert tok.encode(text) == ref.tokenizer.encode(text), text
    ids = ref.tokenizer.encode(text)
    for skip in (True, False):
      assert tok.decode(ids, skip) == ref.tokenizer.decode(ids, skip_special_tokens=skip), (text, skip)
  assert [tok.token_id(t) for t in ("<start_of_image>", "<end_of_image>", "<image_soft_token>")] == [BOI, EOI, IMAGE]


def test_image_token_past_the_sentencepiece_pieces(vision_dir, tmp_path):
  """Gemma 3's `<image_soft_token>` is no piece of tokenizer.model: tokenizer_config.json places it past them."""
  tok_model = (tmp_path / "tokenizer.model")
  tok_model.write_bytes(open(os.path.join(vision_dir, "tokenizer.model"), "rb").read())
  n = load_tokenizer(vision_dir, "gemma")._num_pieces  # the next id, as Gemma 3's 262144
  cfg = {"add_bos_token": True, "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
         "image_token": "<image_gap>", "added_tokens_decoder": {
             str(n): {"content": "<image_gap>", "special": True, "lstrip": False, "rstrip": False,
                      "normalized": False, "single_word": False}}}
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
  ref = tf.GemmaTokenizer.from_pretrained(tmp_path)
  tok = load_tokenizer(tmp_path, "gemma")
  text = "a<start_of_image><image_gap><image_gap><end_of_image> cat <mask>"
  assert tok.encode(text) == ref.encode(text) and tok.token_id("<image_gap>") == ref.image_token_id == n
  assert tok.token_id("<mask>") == ref.mask_token_id == n + 1
  assert tok.decode(ref.encode(text)) == ref.decode(ref.encode(text), skip_special_tokens=True)


# --- pixels ------------------------------------------------------------------------------------------------------
def test_pixels_match_transformers_processor(ours, ref):
  cases = _pil_cases() + _array_cases()
  names, images = zip(*cases)
  text = "Describe" + "<start_of_image>" * len(images)
  a, b = ours(text, list(images)), ref(text=text, images=list(images), return_tensors="np")
  diffs = _max_diffs(a["pixel_values"], b["pixel_values"], names)
  assert max(diffs.values()) <= PIXEL_TOL, {k: v for k, v in diffs.items() if v > PIXEL_TOL}
  np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
  np.testing.assert_array_equal(a["attention_mask"], b["attention_mask"])
  assert len(cases) == 56


@pytest.mark.parametrize("size,resample", [(64, 2), (64, 3), (896, 2)], ids=["64-bilinear", "64-bicubic", "896"])
def test_pixels_match_transformers_at_another_size(size, resample):
  cases = _pil_cases()[-3:] + _array_cases()[:3] if size == 896 else _pil_cases() + _array_cases()
  names, images = zip(*cases)
  # Bicubic also with per-channel mean and std (CLIP's), to catch a swapped channel axis.
  mean, std = ([0.481, 0.458, 0.408], [0.269, 0.261, 0.276]) if resample == 3 else ([0.5] * 3, [0.5] * 3)
  ref = tf.Gemma3ImageProcessorPil(size={"height": size, "width": size}, image_mean=mean, image_std=std,
                                   resample=resample)
  ours = ImageProcessor.from_dict(ref.to_dict())
  assert ours.size == (size, size) and ours.resample == resample
  a, b = ours(list(images)), ref(list(images), return_tensors="np")
  diffs = _max_diffs(a.pixel_values, b["pixel_values"], names)
  assert max(diffs.values()) <= PIXEL_TOL, {k: v for k, v in diffs.items() if v > PIXEL_TOL}


def test_grey_arrays_read_as_mode_l(ours):
  """(H, W) arrays, which transformers rejects, give what it gives for the same grey levels as a mode-L image."""
  grey = _smooth(40, 50, 1, 3)[..., 0]
  settings = ours.image_settings()
  np.testing.assert_array_equal(settings([grey]).pixel_values, settings([PIL.Image.fromarray(grey)]).pixel_values)


def test_image_paths_match_transformers_including_exif_rotation(ours, ref, tmp_path):
  """A path goes through load_image: EXIF orientation applied, alpha dropped, as transformers' load_image."""
  rotated = tmp_path / "rotated.jpg"
  exif = PIL.Image.Exif()
  exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
  PIL.Image.fromarray(_smooth(30, 70, 3, 9)).save(rotated, exif=exif)
  paths = [str(rotated), _photo("grace_hopper.jpg"), _photo("Minduka_Present_Blue_Pack.png")]
  np.testing.assert_array_equal(np.asarray(load_image(rotated)), np.asarray(tf.image_utils.load_image(str(rotated))))
  assert load_image(rotated).size == (30, 70)
  text = "<start_of_image>" * len(paths)
  a, b = ours(text, paths), ref(text=text, images=paths, return_tensors="np")
  assert np.abs(a["pixel_values"] - b["pixel_values"]).max() <= PIXEL_TOL
  np.testing.assert_array_equal(a["input_ids"], b["input_ids"])


# --- pan-and-scan ------------------------------------------------------------------------------------------------
PAS_CASES = [("wide", _smooth(32, 100, 3, 1)), ("tall", _smooth(130, 30, 3, 2)), ("square-ish", _smooth(40, 45, 3, 3)),
             ("logo2.png (wide RGBA)", PIL.Image.open(_photo("logo2.png")))]


@pytest.mark.parametrize("options", [{"pan_and_scan_min_crop_size": 8},
                                     {"pan_and_scan_min_crop_size": 8, "pan_and_scan_max_num_crops": 2},
                                     {"pan_and_scan_min_crop_size": 20, "pan_and_scan_min_ratio_to_activate": 3.5}])
def test_pan_and_scan_matches_transformers(ours, ref, options):
  names, images = zip(*PAS_CASES)
  texts = [f"Describe {name}: <start_of_image>" for name in names]
  a = ours(texts, [[image] for image in images], padding=True, do_pan_and_scan=True, **options)
  b = ref(text=texts, images=[[image] for image in images], padding=True, return_tensors="np",
          do_pan_and_scan=True, **options)
  assert a["pixel_values"].shape == b["pixel_values"].shape
  assert np.abs(a["pixel_values"] - b["pixel_values"]).max() <= PIXEL_TOL
  np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
  np.testing.assert_array_equal(a["attention_mask"], b["attention_mask"])
  crops = [ours.image_settings(do_pan_and_scan=True, **options).process(image)[1] for image in images]
  ref_crops = ref.image_processor(list(images), do_pan_and_scan=True, return_tensors="np", **{
      "pan_and_scan_max_num_crops": 4, "pan_and_scan_min_ratio_to_activate": 1.2, **options})["num_crops"]
  assert crops == list(ref_crops)
  if options.get("pan_and_scan_min_ratio_to_activate", 1.2) < 2:
    assert crops[0] > 0 and crops[1] > 0 and crops[2] == 0  # wide and tall crop; the near-square one does not


def test_pan_and_scan_with_transformers_defaults_on_a_large_image(ours, ref):
  wide = _smooth(300, 1200, 3, 5)  # 4 crops of 300x300 at the default minimum crop of 256
  a = ours("<start_of_image>", [wide], do_pan_and_scan=True)
  b = ref(text="<start_of_image>", images=[wide], do_pan_and_scan=True, return_tensors="np")
  assert a["pixel_values"].shape == b["pixel_values"].shape == (5, 3, 32, 32)
  assert np.abs(a["pixel_values"] - b["pixel_values"]).max() <= PIXEL_TOL
  np.testing.assert_array_equal(a["input_ids"], b["input_ids"])


def test_directory_pan_and_scan_settings(tmp_path):
  """The image processor alone follows the directory's pan-and-scan settings, as AutoImageProcessor does; the
  processor, as transformers' does, keeps pan-and-scan off unless the call asks for it."""
  path, _ = build_t5gemma2_vision_dir(tmp_path, pan_and_scan=True)
  wide = _smooth(32, 100, 3, 1)
  ref_images = tf.AutoImageProcessor.from_pretrained(path)([wide], return_tensors="np")
  ours_images = ImageProcessor.from_dir(path)([wide])
  assert ours_images.num_crops == list(ref_images["num_crops"]) == [3]
  assert np.abs(ours_images.pixel_values - ref_images["pixel_values"]).max() <= PIXEL_TOL
  a = Processor.from_dir(path)("<start_of_image>", [wide])
  b = tf.AutoProcessor.from_pretrained(path)(text="<start_of_image>", images=[wide], return_tensors="np")
  assert a["pixel_values"].shape == b["pixel_values"].shape == (1, 3, 32, 32)
  np.testing.assert_array_equal(a["input_ids"], b["input_ids"])


# --- prompts and batches -----------------------------------------------------------------------------------------
def _same(a, b):
  """Our processor's output `a` equals transformers' `b` (whose token_type_ids T5Gemma 2 ignores)."""
  a = {k: v for k, v in a.items() if k != "token_type_ids"}  # when `a` also comes from transformers
  assert sorted(a) == sorted(k for k in b if k != "token_type_ids"), (sorted(a), sorted(b))
  for key in a:
    if a[key].dtype == object:  # unpadded rows of unequal length
      assert b[key].dtype == object and [list(r) for r in a[key]] == [list(r) for r in b[key]], key
    elif key == "pixel_values":
      assert a[key].shape == b[key].shape and np.abs(a[key] - b[key]).max() <= PIXEL_TOL
    else:
      assert a[key].dtype == b[key].dtype == np.int64, key
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("padding", [False, True])
def test_prompts_and_batches_match_transformers(ours, ref, padding):
  cat, dog, tall = _smooth(20, 30, 3, 1), PIL.Image.fromarray(_smooth(40, 20, 4, 2)), _smooth(90, 30, 3, 3)
  calls = [
      dict(text="Describe <start_of_image> and <start_of_image>, then<start_of_image>.", images=[cat, dog, tall]),
      dict(text=["What is in this picture? <start_of_image>", "<start_of_image> a cat <start_of_image> sat on"],
           images=[[cat], [dog, tall]]),
      dict(text=["a cat sat on the mat", "Describe <start_of_image>"], images=[[], [dog]]),
      dict(text=["a cat sat", "a dog sat on the mat"]),
      dict(text="a cat sat on the mat"),
      dict(text=""),
      dict(text="Describe <start_of_image>", images=cat),  # one image, not in a list
      dict(images=[[cat, dog], [tall]]),  # no text: each text is its images' boi tokens
      dict(text=["same length <start_of_image>", "same length <start_of_image>"], images=[[cat], [tall]]),
  ]
  for call in calls:
    _same(ours(**call, padding=padding), ref(**call, padding=padding, return_tensors="np"))


def test_expand_prompt():
  tokens = ImageTokens(image_seq_length=2)
  block = "\n\n<start_of_image><image_soft_token><image_soft_token><end_of_image>\n\n"
  assert expand_prompt("a <start_of_image> b", [0], tokens) == f"a {block} b"
  assert expand_prompt("<start_of_image>", [2], tokens) == (
      f"Here is the original image {block} and here are some crops to help you see better {block} {block}")
  assert expand_prompt("no image", [], tokens) == "no image"
  with pytest.raises(ValueError, match="holds 1 <start_of_image> but 2 images"):
    expand_prompt("<start_of_image>", [0, 0], tokens)


def test_encode_example_equals_the_processor(ours, ref, tmp_path):
  paths = []
  for k, image in enumerate([_smooth(30, 90, 3, 1), _smooth(50, 50, 4, 2)]):
    paths.append(tmp_path / f"image{k}.png")
    PIL.Image.fromarray(image).save(paths[-1])
  text = "Describe <start_of_image> and <start_of_image>"
  for options in ({}, {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 8}):
    ids, pixels = ours.encode_example(text, paths, **options)
    b = ref(text=text, images=[str(p) for p in paths], return_tensors="np", **options)
    assert ids.dtype == np.int32 and ids.tolist() == b["input_ids"][0].tolist()
    assert pixels.shape == b["pixel_values"].shape and np.abs(pixels - b["pixel_values"]).max() <= PIXEL_TOL
  ids, pixels = ours.encode_example("no image here")
  assert ids.tolist() == ref(text="no image here", return_tensors="np")["input_ids"][0].tolist()
  assert pixels.shape == (0, 3, 32, 32)


# --- errors ------------------------------------------------------------------------------------------------------
def test_image_count_mismatch_is_named(ours, ref):
  cat = _smooth(20, 30, 3, 1)
  bad = [(dict(text=["<start_of_image>", "<start_of_image><start_of_image>"], images=[[cat], [cat]]),
          r"\[1, 2\] in the texts, \[1, 1\] images"),
         (dict(text=["<start_of_image>", "<start_of_image>"], images=[cat, cat]), "for a batch, give one list"),
         (dict(text="Describe <start_of_image>"), "holds <start_of_image> .* but no images were given"),
         (dict(text="Describe", images=[cat]), r"\[0\] in the texts, \[1\] images")]
  for call, message in bad:
    with pytest.raises(ValueError, match=message):
      ours(**call)
    with pytest.raises(ValueError):
      ref(**call, return_tensors="np")
  with pytest.raises(ValueError, match="holds 2 <start_of_image> but 1 image files"):
    ours.encode_example("<start_of_image><start_of_image>", [_photo("grace_hopper.jpg")])
  with pytest.raises(TypeError, match="non-empty list of str"):
    ours([])
  with pytest.raises(TypeError, match="images must be one image"):
    ours("<start_of_image>", images=[1.5])
  with pytest.raises(ValueError, match="uint8"):
    ours("<start_of_image>", images=[np.zeros((8, 8, 3), np.float32)])


def test_unreadable_image_files_are_named(ours, tmp_path):
  jpeg = open(_photo("grace_hopper.jpg"), "rb").read()
  (tmp_path / "truncated.jpg").write_bytes(jpeg[:len(jpeg) // 2])
  (tmp_path / "random.png").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes())
  (tmp_path / "empty.jpg").write_bytes(b"")
  (tmp_path / "folder.jpg").mkdir()
  cases = {"missing.jpg": "no such image file", "truncated.jpg": "cannot decode", "random.png": "not an image file",
           "empty.jpg": "not an image file", "folder.jpg": "not a file"}
  for name, message in cases.items():
    path = str(tmp_path / name)
    with pytest.raises(ImageError, match=f"^{path}: {message}"):
      load_image(path)
    with pytest.raises(ImageError, match=f"^{path}: "):
      ours.encode_example("<start_of_image>", [path])
    with pytest.raises(ImageError, match=f"^{path}: "):
      ours("<start_of_image>", [path])
  assert issubclass(ImageError, ValueError) and t5x_lite.ImageError is ImageError


def test_text_only_processor_refuses_images(vision_dir):
  text_only = Processor.from_dir(vision_dir, has_vision=False)
  assert text_only("a cat")["input_ids"].tolist() == Processor.from_dir(vision_dir)("a cat")["input_ids"].tolist()
  with pytest.raises(ValueError, match="images given, but this model has no vision tower"):
    text_only("<start_of_image>", [_smooth(8, 8, 3, 0)])
  with pytest.raises(ValueError, match="images given, but this model has no vision tower"):
    text_only.encode_example("<start_of_image>", [_photo("grace_hopper.jpg")])
  assert load_processor(vision_dir, types.SimpleNamespace(vision=None)) is None


# --- Model.processor and export ----------------------------------------------------------------------------------
def test_model_processor_survives_export(vision_dir, ref, tmp_path):
  model = t5x_lite.load(vision_dir, progress=False)
  assert isinstance(model.processor, Processor) and model.processor is model.processor
  cat = _smooth(20, 30, 3, 1)
  call = dict(text=["Describe <start_of_image>", "a cat"], images=[[cat], []], padding=True)
  expected = ref(**call, return_tensors="np")
  model.save_hf(str(tmp_path / "hf"))
  model.save(str(tmp_path / "ckpt"))
  for name in ("processor_config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
    assert (tmp_path / "hf" / name).is_file() and (tmp_path / "ckpt" / name).is_file(), name
  _same(tf.AutoProcessor.from_pretrained(tmp_path / "hf")(**call, return_tensors="np"), expected)
  for exported in ("hf", "ckpt"):
    _same(t5x_lite.load(str(tmp_path / exported), progress=False).processor(**call), expected)


def test_model_processor_is_none_without_processor_files(vision_dir, tmp_path):
  for name in os.listdir(vision_dir):
    if name != "processor_config.json":
      os.symlink(os.path.join(vision_dir, name), tmp_path / name)
  model = t5x_lite.load(str(tmp_path), progress=False)
  assert model.tokenizer is not None and model.processor is None
