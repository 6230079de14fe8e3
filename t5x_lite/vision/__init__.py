"""Images for the models that read them (T5Gemma 2): `images` turns image files and arrays into pixel values as
transformers' Gemma 3 image processor does."""

from t5x_lite.vision.images import ImageBatch, ImageProcessor, load_image

__all__ = ["ImageBatch", "ImageProcessor", "load_image"]
