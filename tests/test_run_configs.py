"""Every run config in configs/runs parses and builds its model and data configs (no training)."""

import glob
import os

import gin
import pytest

import t5x_lite.config  # noqa: F401  (registers the configurables)
from t5x_lite.training import run as run_lib  # noqa: F401  (registers DataConfig, run, train)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "runs", "*.gin"))))
def test_run_config_builds(path):
  gin.clear_config()
  gin.add_config_file_search_path(REPO)
  try:
    gin.parse_config_file(path)
    model = gin.query_parameter("train.model").scoped_configurable_fn()
    data = gin.query_parameter("train.data").scoped_configurable_fn()
    assert model.vocab_size > 0 and data.batch_size > 0
    assert gin.query_parameter("TRAIN_STEPS/macro.value") > 0
  finally:
    gin.clear_config()
