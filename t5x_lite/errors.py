"""Errors that name what the user got wrong."""


class ConversionError(ValueError):
  """A checkpoint cannot be read or converted.

  Raised for an unsupported model type, a missing, unexpected or mis-shaped tensor, or a truncated or corrupt
  file. The message names the file and the tensor, and says what was expected and what was found.
  """


class ImageError(ValueError):
  """An image file cannot be used: missing, not a file, not an image, or truncated / corrupt.

  The message names the file and says what went wrong.
  """
