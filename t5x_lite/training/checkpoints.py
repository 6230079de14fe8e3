"""Run checkpoints with orbax: async saves every N steps, keep the last K, restore the latest.

A step directory holds `params`, `opt_state`, `data` (the input iterators' states: one JSON file per process,
as each host reads its own lanes of the batch) and `config` (the model config, JSON), so a workdir is
self-describing: `t5x_lite.load(workdir)` reads the params and config of
its latest checkpoint without knowing the optimizer. Orbax writes into a temporary directory and renames it when
complete, so a process killed at any moment (kill -9 included) leaves the previous checkpoint loadable;
`latest_step` only sees finished ones.
"""

import json
import logging
import os

import grain
import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"
ITEMS = ("params", "opt_state", "data", "config")


class RunCheckpoints:
  """Checkpoints of one training run under WORKDIR/checkpoints/<step>/."""

  def __init__(self, workdir: str, *, save_every: int, keep: int = 3, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    self.save_every = save_every
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                                           cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
        "params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
        "data": grain.checkpoint.CheckpointHandler(), "config": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, batches: grain.DatasetIterator, config_json: str, *, force: bool = False) -> bool:
    """Saves (in the background) when `step` is a multiple of save_every, or when forced. The state of this
    process's input iterator `batches` is read now, before `save` returns."""
    if not force and step % self.save_every:
      return False
    return self.manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state["params"]), opt_state=ocp.args.StandardSave(state["opt_state"]),
        data=grain.checkpoint.CheckpointSave(batches), config=ocp.args.JsonSave(json.loads(config_json))),
                             force=True)

  def restore(self, step: int, abstract_state, batches: grain.DatasetIterator) -> dict:
    """The state at `step` (`abstract_state` gives shapes, dtypes and shardings); this process's input iterator
    `batches` is set to where it was at that step."""
    items = {"params": ocp.args.StandardRestore(abstract_state["params"]),
             "opt_state": ocp.args.StandardRestore(abstract_state["opt_state"])}
    legacy_data = self._data_state_file(step)
    if legacy_data is None:
      items["data"] = grain.checkpoint.CheckpointRestore(batches)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    if legacy_data is not None:
      with open(legacy_data) as f:
        batches.set_state(json.load(f))
    return {"step": step, "params": restored["params"], "opt_state": restored["opt_state"]}

  def _data_state_file(self, step: int) -> str | None:
    """None when `step` holds this process's iterator state as grain writes it (data/process_<i>-of-<n>.json);
    the file to read for a single-process checkpoint of the earlier layout (one JSON state, data/metadata);
    ValueError naming the counts when the step was saved by another number of processes."""
    directory = os.path.join(self.directory, str(step), "data")
    index, count = jax.process_index(), jax.process_count()
    if os.path.exists(os.path.join(directory, f"process_{index}-of-{count}.json")):
      return None
    saved = sorted(f for f in os.listdir(directory) if f.startswith("process_")) if os.path.isdir(directory) else []
    if count == 1 and not saved and os.path.exists(os.path.join(directory, "metadata")):
      return os.path.join(directory, "metadata")
    writers = f"{saved[0].rsplit('-of-', 1)[1][:-len('.json')]} processes" if saved else "no process"
    raise ValueError(f"checkpoint step {step} in {self.directory}: its data iterator states were saved by {writers} "
                     f"({', '.join(saved) or 'data/ holds none'}); this run has {count} process(es): resume with "
                     "the same number of processes")

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def latest_checkpoint(workdir: str) -> str | None:
  """WORKDIR/checkpoints/<latest step> (finished checkpoints only), or None."""
  directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    return None
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                                  item_names=ITEMS)
  step = manager.latest_step()
  manager.close()
  return None if step is None else os.path.join(directory, str(step))


def load_run_params(workdir: str, *, mesh=None, param_dtype: str | None = None, compute_dtype: str | None = None):
  """(config, params, step) from the latest checkpoint of a train.py workdir, placed on `mesh` if given."""
  # Imported here: convert/ knows nothing of training, and this is the one bridge between them.
  from t5x_lite.convert.checkpoint import (  # pylint: disable=import-outside-toplevel
      config_from_json, params_restore_target)

  directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)  # orbax warns that a read-only manager will not save: expected here
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True), item_names=ITEMS)
  absl_logger.setLevel(level)
  try:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"{workdir}: no finished checkpoint under {CHECKPOINT_DIR}/")
    config_json = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    config = config_from_json(json.dumps(config_json), os.path.join(directory, str(step), "config"))
    stored_dtype = config.param_dtype
    target = params_restore_target(config, stored_dtype, mesh)
    params = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]
  finally:
    manager.close()
  if param_dtype and param_dtype != stored_dtype:
    params = jax.tree.map(lambda x: x.astype(param_dtype), params)
  config = config.replace(param_dtype=param_dtype or stored_dtype, dtype=compute_dtype or config.dtype)
  return config, params, step
