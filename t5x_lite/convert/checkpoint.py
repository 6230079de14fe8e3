"""Our own checkpoint format: `config.json` (our config dataclass) + `params/` written by orbax."""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from t5x_lite import sharding
from t5x_lite.convert.staging import move_into_place, temp_dir_beside
from t5x_lite.errors import ConversionError
from t5x_lite.models.params import abstract_params, axes_tree
from t5x_lite.models.registry import FAMILIES, family_of_config

FORMAT_KEY = "t5x_lite_format"


def is_checkpoint_dir(path: str) -> bool:
  cfg = os.path.join(path, "config.json")
  if not (os.path.isdir(os.path.join(path, "params")) and os.path.exists(cfg)):
    return False
  try:
    with open(cfg) as f:
      return FORMAT_KEY in json.load(f)
  except (OSError, json.JSONDecodeError):
    return False


def config_to_json(config) -> str:
  return json.dumps({FORMAT_KEY: 1, "family": config.family, "config": dataclasses.asdict(config)}, indent=2)


def config_from_json(text: str, source: str):
  try:
    data = json.loads(text)
    family = FAMILIES[data["family"]]
    fields = {f.name for f in dataclasses.fields(family.config_class)}
    unknown = set(data["config"]) - fields
    if unknown:
      raise ConversionError(f"{source}: unknown config fields {sorted(unknown)}")
    return family.config_class(**data["config"])
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise ConversionError(f"{source}: not a t5x_lite config ({type(e).__name__}: {e})") from None


def save_checkpoint(params: dict, config, out_dir: str, extra_files: dict[str, bytes] | None = None) -> None:
  """Writes params with orbax, extra files (tokenizer) and config.json into a temporary folder beside `out_dir`
  (`staging.temp_dir_beside`), then moves them into place, config.json last: an error or interruption leaves
  no partial checkpoint, and a directory with a config.json is complete."""
  out_dir = os.path.abspath(out_dir)
  params_dir = os.path.join(out_dir, "params")
  if os.path.exists(params_dir):
    raise FileExistsError(f"{params_dir} already exists; choose an empty --out directory")
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise ConversionError(f"{out_dir}: exists and is not a directory")
  tmp = temp_dir_beside(out_dir)
  try:
    # The context waits for orbax's background writes, also when leaving on an exception (then `tmp` goes).
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(os.path.join(tmp, "params"), params)
    for name, content in {**(extra_files or {}), "config.json": (config_to_json(config) + "\n").encode()}.items():
      with open(os.path.join(tmp, name), "wb") as f:
        f.write(content)
    move_into_place(tmp, out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def read_config(path: str):
  """The config stored in checkpoint directory `path` (its param_dtype is the dtype the params are saved in)."""
  cfg_path = os.path.join(path, "config.json")
  with open(cfg_path) as f:
    return config_from_json(f.read(), cfg_path)


def load_checkpoint(path: str, *, mesh=None, param_dtype: str | None = None, compute_dtype: str | None = None):
  """(config, params) from a directory written by `save_checkpoint`, placed on `mesh` if given."""
  path = os.path.abspath(path)
  config = read_config(path)
  if param_dtype:
    config = config.replace(param_dtype=param_dtype)
  if compute_dtype:
    config = config.replace(dtype=compute_dtype)
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(os.path.join(path, "params"), params_restore_target(config, config.param_dtype, mesh))
  return config, params


def params_restore_target(config, dtype: str, mesh=None):
  """ShapeDtypeStructs with shardings (by the logical-axis rules on `mesh`, else the first device) for
  restoring `config`'s params in `dtype`."""
  specs = family_of_config(config).param_specs(config)
  abstract = abstract_params(specs, jnp.dtype(dtype))
  if mesh is not None:
    shardings = sharding.tree_shardings(mesh, axes_tree(specs), abstract)
  else:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
