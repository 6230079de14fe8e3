"""t5x_lite: T5 and Gemma families in JAX, numerically matching transformers.

Public contract (see README): `load`, `Model`, `ConversionError`, `make_mesh`, and `t5x_lite.data`.
"""

from t5x_lite.errors import ConversionError
from t5x_lite.model import Model, load
from t5x_lite.sharding import make_mesh

__all__ = ["ConversionError", "Model", "load", "make_mesh"]
