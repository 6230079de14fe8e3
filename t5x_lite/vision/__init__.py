"""Images for the models that read them (T5Gemma 2): `images` turns image files and arrays into pixel values as
transformers' Gemma 3 image processor does; `processor` expands the image tokens of prompts and batches text and
pixels as transformers' Gemma3Processor does."""

from t5x_lite.vision.images import ImageBatch, ImageProcessor, load_image
from t5x_lite.vision.processor import ImageTokens, Processor, expand_prompt, load_processor

__all__ = ["ImageBatch", "ImageProcessor", "ImageTokens", "Processor", "expand_prompt", "load_image",
           "load_processor"]
