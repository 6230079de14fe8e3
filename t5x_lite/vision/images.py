"""Images in, pixel arrays out: what transformers' Gemma 3 image processor does, in Pillow and numpy.

Owns image files (`load_image`) and `ImageProcessor`, the equal of transformers 5.23's `Gemma3ImageProcessorPil`
(what `AutoImageProcessor` gives for Gemma 3 / T5Gemma 2 when torchvision is absent, and the "slow" path it
falls back to): convert to RGB (transparency composited on white), optional pan-and-scan crops, resize with a
Pillow filter, rescale, normalize, channel-first float32. The same Pillow calls in the same order, and the same
float64 -> float32 arithmetic, so the pixels are bit-identical to transformers' for the same inputs.

Shapes: H, W the input height and width; S the configured size (height Sh, width Sw); N images out (originals plus
their crops).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from typing import Any, NamedTuple, Sequence

import numpy as np
import PIL.Image
import PIL.ImageOps

from t5x_lite.errors import ImageError

# Where transformers keeps an image processor's settings: since 5.0 nested in processor_config.json (read first),
# before that flat in preprocessor_config.json.
PROCESSOR_CONFIG = "processor_config.json"
PREPROCESSOR_CONFIG = "preprocessor_config.json"


def load_image(path: str | os.PathLike) -> PIL.Image.Image:
  """The image in the file at `path`, fully decoded, as transformers' `load_image(path)` gives it: EXIF
  orientation applied, then `convert("RGB")` (an alpha channel is dropped, not composited: that is what
  transformers does with a path).

  Raises ImageError naming the file when it is missing, a directory, not an image, or truncated / corrupt.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise ImageError(f"{path}: no such image file")
  if not os.path.isfile(path):
    raise ImageError(f"{path}: not a file (an image file was expected)")
  try:
    with PIL.Image.open(path) as image:
      image.load()  # decode now: a truncated file fails here, not later inside a batch
      image = PIL.ImageOps.exif_transpose(image)
      return image.convert("RGB")
  except PIL.UnidentifiedImageError:
    raise ImageError(f"{path}: not an image file Pillow can read") from None
  except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as e:
    # Pillow reports truncated or corrupt data as OSError / SyntaxError / ValueError depending on the codec.
    raise ImageError(f"{path}: cannot decode the image ({type(e).__name__}: {e})") from None


def to_rgb_array(image: Any) -> np.ndarray:
  """(H, W, 3) uint8 RGB of a PIL image or an (H, W) / (H, W, C) uint8 array (C in 1, 3, 4), converted as
  transformers' `convert_to_rgb` does: a PIL image with an alpha band or a transparency entry (RGBA, LA, PA, P with
  transparency) is composited onto white by Pillow; other modes go through `convert("RGB")`. An array's 4th channel
  is alpha, blended onto white in float64 and rounded. (H, W) arrays are grey levels (transformers rejects them;
  here they read as a mode-L image). Arrays are always channels-last (transformers guesses channels-first when the
  height is 1, 3 or 4)."""
  if isinstance(image, PIL.Image.Image):
    try:
      if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = PIL.Image.alpha_composite(background, rgba).convert("RGB")
      else:
        image = image.convert("RGB")
    except (ValueError, OSError) as e:
      raise ValueError(f"cannot convert a mode {image.mode} image to RGB: {e}") from None
    return np.asarray(image)
  arr = _checked_array(image)
  if arr.ndim == 2:
    arr = arr[:, :, None]
  channels = arr.shape[-1]
  if channels == 1:
    return np.repeat(arr, 3, axis=-1)
  if channels == 4:
    alpha = arr[..., 3:4] / 255
    return np.round(alpha * arr[..., :3] + (1 - alpha) * 255).astype(np.uint8)
  return arr


def _checked_array(image: Any) -> np.ndarray:
  if not isinstance(image, np.ndarray):
    raise TypeError(f"an image must be a PIL image or a numpy array, got {type(image).__name__}")
  if image.dtype != np.uint8:
    raise ValueError(f"an image array must be uint8, got {image.dtype}")
  if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (1, 3, 4)) or 0 in image.shape:
    raise ValueError(f"an image array must be (H, W) or (H, W, C) with C in 1, 3, 4, got shape {image.shape}")
  return image


def pan_and_scan(image: np.ndarray, min_crop_size: int, max_num_crops: int, min_ratio_to_activate: float
                 ) -> list[np.ndarray]:
  """The crops of `image` (3, H, W) that transformers' Gemma 3 pan-and-scan adds (possibly none): an image whose
  long side is at least `min_ratio_to_activate` times its short side is cut along the long side into
  round(ratio) crops (at most long // min_crop_size, clamped to [2, max_num_crops]) of ceil(long / n) pixels, the
  last one shorter; none when a crop would be under `min_crop_size`."""
  height, width = image.shape[1:]
  if width >= height:
    if width / height < min_ratio_to_activate:
      return []
    num_w = min(int(math.floor(width / min_crop_size)), int(math.floor(width / height + 0.5)))
    num_w, num_h = min(max_num_crops, max(2, num_w)), 1
  else:
    if height / width < min_ratio_to_activate:
      return []
    num_h = min(int(math.floor(height / min_crop_size)), int(math.floor(height / width + 0.5)))
    num_w, num_h = 1, min(max_num_crops, max(2, num_h))
  crop_w, crop_h = int(math.ceil(width / num_w)), int(math.ceil(height / num_h))
  if min(crop_w, crop_h) < min_crop_size:
    return []
  return [image[:, top:top + crop_h, left:left + crop_w]
          for top, left in itertools.product(range(0, crop_h * num_h, crop_h), range(0, crop_w * num_w, crop_w))]


class ImageBatch(NamedTuple):
  """pixel_values (N, 3, Sh, Sw) float32: each image followed by its pan-and-scan crops; num_crops: crops per
  input image (0 without pan-and-scan)."""
  pixel_values: np.ndarray
  num_crops: list[int]


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
  """Gemma 3's image preprocessing; the defaults are transformers' `Gemma3ImageProcessorPil` class defaults (what
  it uses for a key missing from the config). `size` is (height, width); `resample` a Pillow filter number
  (2 = bilinear)."""
  size: tuple[int, int] = (224, 224)
  resample: int = PIL.Image.Resampling.BILINEAR
  do_convert_rgb: bool = True
  do_resize: bool = True
  do_rescale: bool = True
  rescale_factor: float = 1 / 255
  do_normalize: bool = True
  image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
  image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
  do_pan_and_scan: bool = False
  # transformers leaves these unset in the image processor and takes Gemma3Processor's values (256, 4, 1.2).
  pan_and_scan_min_crop_size: int = 256
  pan_and_scan_max_num_crops: int = 4
  pan_and_scan_min_ratio_to_activate: float = 1.2

  def __post_init__(self):
    for name in ("image_mean", "image_std"):
      value = getattr(self, name)
      value = (float(value),) * 3 if isinstance(value, (int, float)) else tuple(map(float, value))
      if len(value) != 3:
        raise ValueError(f"{name} must hold 3 values (one per RGB channel), got {value}")
      object.__setattr__(self, name, value)
    height, width = self.size
    if height < 1 or width < 1:
      raise ValueError(f"size must be positive, got {self.size}")
    object.__setattr__(self, "size", (int(height), int(width)))
    try:
      PIL.Image.Resampling(self.resample)
    except ValueError:
      raise ValueError(f"resample {self.resample!r} is not a Pillow filter number (0-5)") from None

  # --- from a model directory ---------------------------------------------------------------------------------
  @classmethod
  def from_dict(cls, config: dict) -> "ImageProcessor":
    """From an image processor dict as transformers saves it (`size` {"height", "width"} or an int); keys that are
    absent or null take the defaults; keys that do not change Gemma 3's preprocessing are ignored."""
    kwargs = {f.name: config[f.name] for f in dataclasses.fields(cls) if config.get(f.name) is not None}
    size = kwargs.get("size")
    if size is not None:
      if isinstance(size, int):
        size = (size, size)
      elif isinstance(size, dict) and set(size) >= {"height", "width"}:
        size = (size["height"], size["width"])
      else:
        raise ValueError(f"image processor size {size!r} is not supported: Gemma 3 resizes to {{height, width}}")
      kwargs["size"] = size
    unsupported = [k for k in ("do_center_crop", "do_pad") if config.get(k)]
    if unsupported:
      raise ValueError(f"image processor options {unsupported} are not part of Gemma 3's preprocessing")
    return cls(**kwargs)

  @classmethod
  def from_dir(cls, model_dir: str) -> "ImageProcessor | None":
    """The image processor saved in `model_dir` (processor_config.json's "image_processor", else
    preprocessor_config.json, as transformers looks them up), or None when neither holds one."""
    config = image_processor_dict(model_dir)
    if config is None:
      return None
    try:
      return cls.from_dict(config)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{model_dir}: cannot read the image processor config: {e}") from None

  # --- processing ---------------------------------------------------------------------------------------------
  def __call__(self, images: Sequence[Any]) -> ImageBatch:
    """Pixel values of a list of images (PIL images or uint8 arrays, see `to_rgb_array`), each followed by its
    pan-and-scan crops when `do_pan_and_scan`."""
    pixels, num_crops = [], []
    for image in images:
      one, crops = self.process(image)
      pixels.append(one)
      num_crops.append(crops)
    if not pixels:
      return ImageBatch(np.zeros((0, 3) + self.size, np.float32), [])
    shapes = {p.shape[1:] for p in pixels}
    if len(shapes) > 1:  # only without do_resize
      raise ValueError(f"images of different sizes {sorted(shapes)} cannot form one batch (do_resize is off)")
    return ImageBatch(np.concatenate(pixels), num_crops)

  def process(self, image: Any) -> tuple[np.ndarray, int]:
    """(1 + crops, 3, Sh, Sw) float32 pixels of one image and its crops, and the number of crops."""
    if self.do_convert_rgb:
      chw = np.moveaxis(to_rgb_array(image), -1, 0)
    else:
      arr = np.asarray(image) if isinstance(image, PIL.Image.Image) else _checked_array(image)
      if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"do_convert_rgb is off, so images must already be RGB; got shape {arr.shape}")
      chw = np.moveaxis(arr, -1, 0)
    crops = []
    if self.do_pan_and_scan:
      crops = pan_and_scan(chw, self.pan_and_scan_min_crop_size, self.pan_and_scan_max_num_crops,
                           self.pan_and_scan_min_ratio_to_activate)
    return np.stack([self._pixels(x) for x in [chw] + crops]), len(crops)

  def _pixels(self, chw: np.ndarray) -> np.ndarray:
    """(3, Sh, Sw) float32 of a (3, H, W) uint8 image: transformers' PIL-backend resize, rescale, normalize."""
    if self.do_resize:
      pil = PIL.Image.fromarray(np.ascontiguousarray(np.moveaxis(chw, 0, -1)))
      resized = pil.resize((self.size[1], self.size[0]), resample=self.resample)
      chw = np.moveaxis(np.asarray(resized), -1, 0)
    x = chw
    if self.do_rescale:
      # transformers multiplies in float64 and rounds to float32 once.
      x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
    if self.do_normalize:
      x = x.astype(np.float32) if not np.issubdtype(x.dtype, np.floating) else x
      mean = np.asarray(self.image_mean, np.float32)[:, None, None]
      std = np.asarray(self.image_std, np.float32)[:, None, None]
      x = (x - mean) / std  # float32 throughout, as transformers' normalize
    return np.asarray(x, np.float32)


def image_processor_dict(model_dir: str) -> dict | None:
  """The image processor settings in `model_dir`: processor_config.json's "image_processor" (transformers >= 5),
  else preprocessor_config.json; None when there are neither."""
  nested = read_json(os.path.join(model_dir, PROCESSOR_CONFIG))
  if isinstance(nested.get("image_processor"), dict):
    return nested["image_processor"]
  path = os.path.join(model_dir, PREPROCESSOR_CONFIG)
  return read_json(path) if os.path.isfile(path) else None


def read_json(path: str) -> dict:
  """The JSON object in `path`, {} when there is no such file; ValueError naming the file when it is not one."""
  if not os.path.isfile(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: not a readable JSON file ({e})") from None
  if not isinstance(data, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
  return data
