"""Every run config in configs/runs parses and builds its model and data configs (no training); a run config that
names a mesh says what it assumes of the devices, and its batch divides over the mesh."""

import glob
import os

import gin
import pytest

from t5x_lite import sharding
from t5x_lite.config import t5_config_from_hf  # importing t5x_lite.config registers the model configurables
from t5x_lite.data.pipeline import DataConfig
from t5x_lite.training.init_from import config_from_base
from t5x_lite.training.run import run  # registers run and train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = sorted(glob.glob(os.path.join(REPO, "configs", "runs", "*.gin")))


def _parse(path):
  gin.clear_config()
  gin.add_config_file_search_path(REPO)
  gin.parse_config_file(path)


@pytest.mark.parametrize("path", RUNS)
def test_run_config_builds(path):
  try:
    _parse(path)
    model = gin.query_parameter("train.model").scoped_configurable_fn()
    data = gin.query_parameter("train.data").scoped_configurable_fn()
    assert model.vocab_size > 0 and isinstance(data, DataConfig) and data.batch_size > 0
    assert gin.get_bindings(run)["corpus"] in ("stdlib", "files")
    assert gin.query_parameter("TRAIN_STEPS/macro.value") > 0
  finally:
    gin.clear_config()


@pytest.mark.parametrize("path", RUNS)
def test_run_config_mesh_fits_its_batch(path):
  """A default mesh must parse and split the global batch evenly over its batch axes (data x fsdp), and the file
  must state the devices and memory it was sized for."""
  try:
    _parse(path)
    try:
      mesh = gin.query_parameter("%MESH")
    except ValueError:  # no MESH macro: the run takes all devices on the data axis
      mesh = ""
    data = gin.query_parameter("train.data").scoped_configurable_fn()
  finally:
    gin.clear_config()
  if not mesh:
    return
  sizes = sharding.parse_mesh_spec(mesh)
  assert data.batch_size % (sizes["data"] * sizes["fsdp"]) == 0, (mesh, data.batch_size)
  with open(path) as f:
    assert "Memory assumption" in f.read()


# google/t5-v1_1-xxl's config.json (google/flan-t5-xxl's says the same), with its separate lm_head.
T5_1_1_XXL = dict(model_type="t5", architectures=["T5ForConditionalGeneration"], vocab_size=32128, d_model=4096,
                  d_kv=64, d_ff=10240, num_layers=24, num_decoder_layers=24, num_heads=64,
                  feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.1)


def test_xxl_finetune_accepts_the_published_xxl_checkpoint_and_refuses_another_shape():
  try:
    _parse(os.path.join(REPO, "configs", "runs", "finetune_t5_1_1_xxl.gin"))
    model = gin.query_parameter("train.model").scoped_configurable_fn()
    xxl = t5_config_from_hf(T5_1_1_XXL, {"lm_head.weight"})
    assert config_from_base(model, xxl, "t5-v1_1-xxl") == xxl.replace(dtype="bfloat16", dropout_rate=0.1)
    xl = t5_config_from_hf(dict(T5_1_1_XXL, d_model=2048, d_ff=5120, num_heads=32), {"lm_head.weight"})
    with pytest.raises(ValueError, match="d_model: 4096 configured, 2048 in the checkpoint"):
      config_from_base(model, xl, "t5-v1_1-xl")
  finally:
    gin.clear_config()
