"""Model configs: frozen dataclasses built from a transformers `config.json`, and written back to one.

A config holds what the forward pass needs, plus the compute and parameter dtypes and the remat policy, so
that one hashable object can be a static jit argument and a gin binding target. One module per family.
"""

from t5x_lite.config.gemma import GEMMA_MODEL_TYPES, GemmaConfig, gemma_config_from_hf, gemma_config_to_hf
from t5x_lite.config.siglip import SiglipVisionConfig
from t5x_lite.config.t5 import T5_MODEL_TYPES, T5Config, t5_config_from_hf, t5_config_to_hf
from t5x_lite.config.t5gemma2 import (T5GEMMA2_MODEL_TYPES, T5Gemma2Config, t5gemma2_config_from_hf,
                                      t5gemma2_config_to_hf)

__all__ = ["GEMMA_MODEL_TYPES", "GemmaConfig", "SiglipVisionConfig", "T5GEMMA2_MODEL_TYPES", "T5Gemma2Config",
           "T5_MODEL_TYPES", "T5Config", "gemma_config_from_hf", "gemma_config_to_hf", "t5_config_from_hf",
           "t5_config_to_hf", "t5gemma2_config_from_hf", "t5gemma2_config_to_hf"]
