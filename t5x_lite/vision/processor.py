"""Text + images in, model inputs out: transformers' `Gemma3Processor` (what `AutoProcessor` builds for Gemma 3 and
T5Gemma 2), without transformers.

Owns prompt expansion and batching: each `<start_of_image>` (the boi token) a prompt holds becomes
`"\\n\\n" + boi + image_token * image_seq_length + eoi + "\\n\\n"` (with pan-and-scan crops, a sentence introducing
the original and one such block per crop), the expanded texts go through the directory's tokenizer, and the images
through `ImageProcessor`. Parity target: `AutoProcessor.from_pretrained(dir)(text=..., images=...,
return_tensors="np")` of transformers 5.23 (its PIL backend), which

- takes the image settings of Gemma3Processor's own defaults, not the directory's: pan-and-scan is off (and its
  crop size 256, at most 4 crops, ratio 1.2) unless asked for at call time, whatever the image processor config
  says; RGB conversion is always on;
- pads nothing unless `padding=True`, which pads on the tokenizer's side (GemmaTokenizer: the left); a batch
  of unequal lengths without padding comes back as 1-D object arrays of id lists;
- takes images as one image, a list of images (all for one text), or a list of lists (one per text).

Shapes: B texts, T tokens, N images plus crops, S the image size (Sh, Sw).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Sequence

import numpy as np
import PIL.Image

from t5x_lite.errors import ImageError
from t5x_lite.vision import images as images_lib
from t5x_lite.vision.images import ImageProcessor, load_image

# Gemma3Processor's `images_kwargs`: they override the image processor's own settings on every call.
CALL_DEFAULTS = {"do_convert_rgb": True, "do_pan_and_scan": False, "pan_and_scan_min_crop_size": 256,
                 "pan_and_scan_max_num_crops": 4, "pan_and_scan_min_ratio_to_activate": 1.2}
DEFAULT_IMAGE_SEQ_LENGTH = 256  # Gemma3Processor's default when processor_config.json does not say
# The tokenizer files name the image tokens under these keys (tokenizer_config.json, as transformers reads it).
TOKEN_KEYS = ("boi_token", "image_token", "eoi_token")


@dataclasses.dataclass(frozen=True)
class ImageTokens:
  """The text of Gemma 3's image tokens and how many soft tokens stand for one image."""
  boi: str = "<start_of_image>"
  image: str = "<image_soft_token>"
  eoi: str = "<end_of_image>"
  image_seq_length: int = DEFAULT_IMAGE_SEQ_LENGTH

  @property
  def block(self) -> str:
    """The text one image (or one crop) becomes."""
    return f"\n\n{self.boi}{self.image * self.image_seq_length}{self.eoi}\n\n"

  def replacement(self, num_crops: int) -> str:
    """What one `boi` of a prompt becomes for an image with `num_crops` pan-and-scan crops."""
    if not num_crops:
      return self.block
    return (f"Here is the original image {self.block} and here are some crops to help you see better "
            + " ".join([self.block] * num_crops))


def expand_prompt(text: str, num_crops: Sequence[int], tokens: ImageTokens = ImageTokens()) -> str:
  """`text` with its k-th `tokens.boi` replaced by the image block(s) of an image with `num_crops[k]` crops (0 for
  none). ValueError when the text holds another number of boi tokens than `num_crops` has entries."""
  parts = text.split(tokens.boi)
  if len(parts) - 1 != len(num_crops):
    raise ValueError(f"the text holds {len(parts) - 1} {tokens.boi} but {len(num_crops)} images were given for it: "
                     f"{_snippet(text)}")
  out = [parts[0]]
  for crops, part in zip(num_crops, parts[1:]):
    out += [tokens.replacement(crops), part]
  return "".join(out)


class Processor:
  """Tokenizer + ImageProcessor of a Gemma 3 / T5Gemma 2 directory; `__call__` equals transformers' processor.

  `image_processor` None makes a text-only processor (a model without a vision tower, or a directory without
  image processor files): images are then refused with `no_images_reason`.
  """

  def __init__(self, tokenizer, image_processor: ImageProcessor | None, tokens: ImageTokens | None = None, *,
               padding_side: str = "left", no_images_reason: str = "this model has no vision tower"):
    if padding_side not in ("left", "right"):
      raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    self.tokenizer = tokenizer
    self.image_processor = image_processor
    self.tokens = tokens or ImageTokens()
    self.padding_side = padding_side
    self.no_images_reason = no_images_reason
    if image_processor is not None:
      missing = [t for t in (self.tokens.boi, self.tokens.image, self.tokens.eoi) if tokenizer.token_id(t) is None]
      if missing:
        raise ValueError(f"the tokenizer has no single id for the image tokens {missing}")

  @classmethod
  def from_dir(cls, model_dir: str, tokenizer=None, *, has_vision: bool = True) -> "Processor":
    """The processor of `model_dir`: its tokenizer (`tokenizer`, else read from the directory), the image processor
    of processor_config.json / preprocessor_config.json, `image_seq_length` of processor_config.json (default 256,
    as transformers), and the boi / image / eoi tokens the tokenizer files name. `has_vision=False` (the model has
    no vision tower) or no image processor files give a text-only processor."""
    model_dir = os.fspath(model_dir)
    if tokenizer is None:
      from t5x_lite.tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel
      tokenizer = load_tokenizer(model_dir, "gemma")
    if tokenizer is None:
      raise ValueError(f"{model_dir}: no tokenizer.model, so no processor")
    padding_side = images_lib.read_json(os.path.join(model_dir, "tokenizer_config.json")).get("padding_side",
                                                                                              "left")
    image_processor = ImageProcessor.from_dir(model_dir) if has_vision else None
    if image_processor is None:
      reason = ("this model has no vision tower" if not has_vision else
                f"{model_dir} has no {images_lib.PROCESSOR_CONFIG} or {images_lib.PREPROCESSOR_CONFIG}")
      return cls(tokenizer, None, padding_side=padding_side, no_images_reason=reason)
    named = getattr(tokenizer, "named_tokens", {})
    missing = [key for key in TOKEN_KEYS if key not in named]
    if missing:
      raise ValueError(f"{model_dir}: its tokenizer files (tokenizer_config.json) name no {', '.join(missing)}, "
                       "so images cannot be placed in the text")
    processor_config = images_lib.read_json(os.path.join(model_dir, images_lib.PROCESSOR_CONFIG))
    seq = processor_config.get("image_seq_length")
    tokens = ImageTokens(boi=named["boi_token"], image=named["image_token"], eoi=named["eoi_token"],
                         image_seq_length=int(DEFAULT_IMAGE_SEQ_LENGTH if seq is None else seq))
    try:
      return cls(tokenizer, image_processor, tokens, padding_side=padding_side)
    except ValueError as e:
      raise ValueError(f"{model_dir}: {e}") from None

  # --- ids of the image tokens --------------------------------------------------------------------------------
  @property
  def boi_token_id(self) -> int:
    return self.tokenizer.token_id(self.tokens.boi)

  @property
  def image_token_id(self) -> int:
    return self.tokenizer.token_id(self.tokens.image)

  @property
  def eoi_token_id(self) -> int:
    return self.tokenizer.token_id(self.tokens.eoi)

  @property
  def image_seq_length(self) -> int:
    return self.tokens.image_seq_length

  # --- pieces for infer.py and the data pipeline ----------------------------------------------------------------
  def expand_prompt(self, text: str, num_crops: Sequence[int]) -> str:
    """`text` with each `<start_of_image>` replaced as transformers does for images with these crop counts."""
    return expand_prompt(text, num_crops, self.tokens)

  def image_settings(self, **overrides) -> ImageProcessor:
    """The image processor as a call uses it: Gemma3Processor's call defaults over the directory's settings, then
    `overrides` (do_pan_and_scan, pan_and_scan_min_crop_size, ...; None keeps the default)."""
    self._need_images()
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ImageProcessor)}
    if unknown:
      raise TypeError(f"unknown image options {sorted(unknown)}")
    settings = {**CALL_DEFAULTS, **{k: v for k, v in overrides.items() if v is not None}}
    return dataclasses.replace(self.image_processor, **settings)

  def encode_example(self, text: str, image_paths: Sequence[str | os.PathLike] = (), **image_options
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(ids (T,) int32, pixels (N, 3, Sh, Sw) float32) of one prompt and the image files its `<start_of_image>`
    tokens stand for, in order (N = images + their crops). ImageError names a file that cannot be read;
    ValueError says when the prompt's image tokens and the files disagree in number."""
    image_paths = list(image_paths)
    if self.image_processor is None:
      if image_paths:
        self._need_images()
      return np.asarray(self.tokenizer.encode(text), np.int32), np.zeros((0, 3, 0, 0), np.float32)
    count = text.count(self.tokens.boi)
    if count != len(image_paths):
      raise ValueError(f"the text holds {count} {self.tokens.boi} but {len(image_paths)} image files were given: "
                       f"{_snippet(text)}")
    pixels, num_crops = self.image_files(image_paths, **image_options)
    ids = self.tokenizer.encode(self.expand_prompt(text, num_crops))
    return np.asarray(ids, np.int32), pixels

  def image_files(self, image_paths: Sequence[str | os.PathLike], **image_options) -> tuple[np.ndarray, list[int]]:
    """(pixels (N, 3, Sh, Sw) float32 of the files in order, each followed by its crops; crops per file).
    ImageError names a file that cannot be read or preprocessed."""
    settings = self.image_settings(**image_options)
    pixels, num_crops = [], []
    for path in image_paths:
      image = load_image(path)
      try:
        one, crops = settings.process(image)
      except ValueError as e:
        raise ImageError(f"{os.fspath(path)}: {e}") from None
      pixels.append(one)
      num_crops.append(crops)
    return (np.concatenate(pixels) if pixels else np.zeros((0, 3) + settings.size, np.float32)), num_crops

  # --- the transformers-equal call ------------------------------------------------------------------------------
  def __call__(self, text: str | Sequence[str] | None = None, images: Any = None, *, padding: bool | str = False,
               **image_options) -> dict[str, np.ndarray]:
    """`input_ids` and `attention_mask` (B, T) int64, and `pixel_values` (N, 3, Sh, Sw) float32 when images are
    given, equal to transformers' `AutoProcessor.from_pretrained(dir)(text=text, images=images,
    return_tensors="np", padding=padding, **image_options)`.

    `text`: a str or a list of str; None with images gives each text as its images' boi tokens joined by spaces.
    `images`: one image, a list (for a single text), or a list of lists (one per text); each a PIL image, an
    (H, W) / (H, W, C) uint8 array, or a file path (read by `load_image`). `padding`: False / "do_not_pad", or
    True / "longest" (to the longest text, on `padding_side`). `image_options`: do_pan_and_scan,
    pan_and_scan_min_crop_size, pan_and_scan_max_num_crops, pan_and_scan_min_ratio_to_activate, ...
    """
    if padding not in (False, True, "longest", "do_not_pad"):
      raise ValueError(f"padding must be False, True, 'longest' or 'do_not_pad', got {padding!r}")
    if text is None and images is None:
      raise ValueError("give text, images or both")
    groups = None
    if images is not None:
      self._need_images()
      groups = _nest(images)
    if text is None:
      text = [" ".join([self.tokens.boi] * len(group)) for group in groups]
    texts = _texts(text)
    if self.image_processor is not None:
      self._check_counts(texts, groups)
    out = {}
    num_crops = []
    if groups is not None:
      flat = [image for group in groups for image in group]
      batch = self.image_settings(**image_options)(flat)
      out["pixel_values"], num_crops = batch.pixel_values, batch.num_crops
    crops_iter = iter(num_crops)
    ids = []
    for t in texts:
      if groups is not None:
        t = self.expand_prompt(t, [next(crops_iter) for _ in range(t.count(self.tokens.boi))])
      ids.append(self.tokenizer.encode(t))
    out = {**self._batch(ids, padding not in (False, "do_not_pad")), **out}
    return out

  def _need_images(self) -> None:
    if self.image_processor is None:
      raise ValueError(f"images given, but {self.no_images_reason}: this processor reads text only")

  def _check_counts(self, texts: list[str], groups: list[list] | None) -> None:
    """transformers' checks: each text holds as many boi tokens as its images."""
    in_text = [t.count(self.tokens.boi) for t in texts]
    if groups is None:
      if any(in_text):
        raise ValueError(f"the text holds {self.tokens.boi} ({in_text} per text) but no images were given")
      return
    given = [len(g) for g in groups]
    if in_text != given:
      hint = (" (a flat list of images belongs to one text: for a batch, give one list of images per text)"
              if len(groups) == 1 and len(texts) > 1 else "")
      raise ValueError(f"the number of {self.tokens.boi} in each text and of images given for it differ: "
                       f"{in_text} in the texts, {given} images{hint}")

  def _batch(self, ids: list[list[int]], pad: bool) -> dict[str, np.ndarray]:
    """int64 (B, T) ids and mask; padded to the longest row on `padding_side` when `pad`, else (rows of unequal
    length) 1-D object arrays of lists as transformers returns them."""
    longest = max(len(row) for row in ids)
    if not pad and any(len(row) != longest for row in ids):
      ragged_ids, ragged_mask = np.empty(len(ids), object), np.empty(len(ids), object)
      for k, row in enumerate(ids):
        ragged_ids[k], ragged_mask[k] = list(row), [1] * len(row)
      return {"input_ids": ragged_ids, "attention_mask": ragged_mask}
    pad_id = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
    input_ids = np.full((len(ids), longest), pad_id, np.int64)
    mask = np.zeros((len(ids), longest), np.int64)
    for k, row in enumerate(ids):
      cols = slice(longest - len(row), longest) if self.padding_side == "left" else slice(0, len(row))
      input_ids[k, cols], mask[k, cols] = row, 1
    return {"input_ids": input_ids, "attention_mask": mask}

  def __repr__(self):
    size = None if self.image_processor is None else self.image_processor.size
    return (f"Processor(image size {size}, {self.tokens.image_seq_length} tokens per image, "
            f"padding_side={self.padding_side!r})")


def _texts(text) -> list[str]:
  if isinstance(text, str):
    return [text]
  if isinstance(text, (list, tuple)) and text and all(isinstance(t, str) for t in text):
    return list(text)
  raise TypeError(f"text must be a str or a non-empty list of str, got {type(text).__name__}"
                  + (" (empty)" if isinstance(text, (list, tuple)) and not text else ""))


def _is_image(x) -> bool:
  return isinstance(x, (PIL.Image.Image, np.ndarray, str, os.PathLike))


def _nest(images) -> list[list]:
  """Images as one list per text, as transformers' `make_nested_list_of_images` nests them; file paths are read."""
  if isinstance(images, (list, tuple)) and all(isinstance(g, (list, tuple)) for g in images) \
     and all(all(map(_is_image, g)) for g in images):
    nested = [list(g) for g in images]
  elif isinstance(images, (list, tuple)) and images and all(map(_is_image, images)):
    nested = [list(images)]
  elif _is_image(images):
    nested = [[images]]
  else:
    raise TypeError("images must be one image, a list of images, or a list of lists of images (PIL images, uint8 "
                    f"arrays or file paths), got {type(images).__name__}")
  return [[load_image(x) if isinstance(x, (str, os.PathLike)) else x for x in g] for g in nested]


def _snippet(text: str, width: int = 60) -> str:
  return repr(text if len(text) <= width else text[:width] + "...")


def load_processor(model_dir: str | None, config=None, tokenizer=None) -> Processor | None:
  """The processor of a model directory whose model reads images (`config.vision` set, when `config` is given) and
  that holds image processor files; None otherwise. Warns when `config`'s image token ids or tokens per image are
  not the processor's (the images would not reach the model)."""
  if config is not None and getattr(config, "vision", None) is None:
    return None
  if model_dir is None or images_lib.image_processor_dict(os.fspath(model_dir)) is None:
    return None
  processor = Processor.from_dir(model_dir, tokenizer)
  if config is not None:
    ours = {"boi_token_index": processor.boi_token_id, "eoi_token_index": processor.eoi_token_id,
            "image_token_index": processor.image_token_id, "mm_tokens_per_image": processor.image_seq_length}
    differ = [f"{name}: config {getattr(config, name)}, processor {value}" for name, value in ours.items()
              if getattr(config, name, value) != value]
    if differ:
      warnings.warn(f"{model_dir}: the processor files disagree with config.json ({'; '.join(differ)}): images "
                    "will not reach the model as it expects", stacklevel=2)
  return processor
