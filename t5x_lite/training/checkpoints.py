"""Run checkpoints with orbax: async saves every N steps, keep the last K, restore the latest.

A step directory holds `params`, `opt_state`, `data` (the input iterators' states: one JSON file per process,
as each host reads its own lanes of the batch; read back as the global batch's lanes, so that a run resumes on
another process count) and `config` (the model config, JSON), so a workdir is
self-describing: `t5x_lite.load(workdir)` reads the params and config of
its latest checkpoint without knowing the optimizer. Orbax writes into a temporary directory and renames it when
complete, so a process killed at any moment (kill -9 included) leaves the previous checkpoint loadable;
`latest_step` only sees finished ones.
"""

import contextlib
import json
import logging
import os
import sys

import grain
import jax
import orbax.checkpoint as ocp

from t5x_lite.data import pipeline
from t5x_lite.errors import ConversionError

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

  def restore(self, step: int, abstract_state, batches: grain.DatasetIterator, *,
              allow_batch_size_change: bool = False) -> dict:
    """The state at `step` (`abstract_state` gives shapes, dtypes and shardings: orbax reads each array into them,
    so the run may have another device or process count than the one that saved it); this process's input iterator
    `batches` is set to where its lanes were at that step (saved_data_lanes), whichever process saved them."""
    lanes = saved_data_lanes(self.directory, step)
    fresh = batches.get_state()
    batch_size, saved_batch_size = len(fresh["parents"]) * jax.process_count(), len(lanes)
    start = None
    if saved_batch_size != batch_size:
      if not allow_batch_size_change:
        raise batch_size_refusal(self.directory, step, saved_batch_size, batch_size)
      lanes, start = pipeline.rebatched_lanes(lanes, batch_size, fresh["parents"][0])
    items = {"params": ocp.args.StandardRestore(abstract_state["params"]),
             "opt_state": ocp.args.StandardRestore(abstract_state["opt_state"])}
    with readable(self.manager, step):
      saved_opt_state = self.manager.item_metadata(step)["opt_state"]
    self._check_optimizer_layout(step, saved_opt_state, abstract_state["opt_state"])
    with readable(self.manager, step):
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    batches.set_state(pipeline.host_state(lanes))
    if start is not None and jax.process_index() == 0:
      print(f"WARNING: the global batch changed from {saved_batch_size} to {batch_size} "
            f"rows: the data resumes at document {start} of the shuffled stream, the first one some row had not "
            "finished; later documents that other rows had read are read again", file=sys.stderr)
    return {"step": step, "params": restored["params"], "opt_state": restored["opt_state"]}

  def _check_optimizer_layout(self, step: int, saved, target) -> None:
    """ValueError when the optimizer state saved at `step` (orbax's metadata tree) has other arrays or shapes than
    this run's optimizer keeps (`target`): a run saved with another optimizer, or with the optax Adafactor used
    before training/adafactor.py (one state per parameter, factored over the two largest axes only), whose
    statistics cannot be turned into per-layer ones. Orbax would report it as a tree mismatch, which reads like a
    damaged checkpoint."""
    have, want = _leaf_shapes(saved), _leaf_shapes(target)
    if have == want:
      return
    only_saved = sorted(set(have) - set(want))
    only_run = sorted(set(want) - set(have))
    if only_saved or only_run:
      difference = "; ".join(part for part in (
          f"{len(only_saved)} arrays only in the checkpoint (e.g. {only_saved[0]})" if only_saved else "",
          f"{len(only_run)} only in this run's optimizer (e.g. {only_run[0]})" if only_run else "") if part)
    else:
      name = next(k for k in sorted(want) if have[k] != want[k])
      difference = f"{name} has shape {have[name]} in the checkpoint and {want[name]} in this run's optimizer"
    workdir = os.path.dirname(self.directory)
    raise ValueError(
        f"checkpoint step {step} in {self.directory}: its optimizer state does not fit this run's optimizer "
        f"({difference}). It was saved with another optimizer (train.optimizer) or optimizer settings, or by a "
        "t5x_lite before its T5X-style Adafactor (training/adafactor.py: second moments factored over the logical "
        "axes, each layer of a stack on its own), whose optax Adafactor state cannot be converted. Resume with the "
        "optimizer that saved it, or start a new workdir from its weights (the optimizer state starts afresh): "
        f"--gin.train.init_params_from=\"'{workdir}'\"")

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def saved_data_lanes(directory: str, step: int) -> list[dict]:
  """The global batch's lane states saved at `step` under `directory` (WORKDIR/checkpoints), in row order: every
  process's data/process_<i>-of-<n>.json (grain's handler; each holds that process's lanes), or a single-process
  checkpoint of the earlier layout (one state in data/metadata). ValueError naming what is missing."""
  data = os.path.join(directory, str(step), "data")
  names = sorted(f for f in os.listdir(data) if f.startswith("process_")) if os.path.isdir(data) else []
  if not names and os.path.exists(os.path.join(data, "metadata")):
    paths = [os.path.join(data, "metadata")]
  else:
    counts = {name.rsplit("-of-", 1)[-1].removesuffix(".json") for name in names}
    count = int(counts.pop()) if len(counts) == 1 and all(c.isdigit() for c in counts) else 0
    paths = [os.path.join(data, f"process_{i}-of-{count}.json") for i in range(count)]
    missing = [os.path.basename(p) for p in paths if not os.path.exists(p)]
    if not count or missing:
      held = ", ".join(names) or "data/ holds none"
      raise ValueError(f"checkpoint step {step} in {directory}: its data iterator states are incomplete ({held}"
                       f"{'; missing ' + ', '.join(missing) if missing else ''})")
  states = []
  for path in paths:
    try:
      with open(path) as f:
        states.append(json.load(f))
    except ValueError as e:  # a truncated or edited file
      raise ValueError(f"checkpoint step {step}: {path} is not a data iterator state ({e})") from None
  try:
    return pipeline.lanes_of_states(states)
  except ValueError as e:
    raise ValueError(f"checkpoint step {step} in {directory}: {e}") from None


def batch_size_refusal(directory: str, step: int, saved: int, now: int) -> ValueError:
  return ValueError(
      f"checkpoint step {step} in {directory} was saved with a global batch of {saved} rows and this run's is {now} "
      f"(DataConfig.batch_size): resume with --gin.BATCH_SIZE={saved} (any process or device count that divides "
      f"it), or accept a regrouped data stream with --gin.train.allow_batch_size_change=True (no document is "
      "skipped, some are read again)")


def _leaf_shapes(tree) -> dict[str, tuple[int, ...]]:
  """{path "a/b/0": shape} of a tree's arrays; NamedTuple fields, dict keys and sequence indices alike (orbax's
  metadata has dicts where the state has NamedTuples)."""
  def name(key):
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        return str(getattr(key, attr))
    return str(key)
  return {"/".join(map(name, path)): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def latest_step(workdir: str) -> int | None:
  """The step of the latest finished checkpoint of the run in `workdir`, or None (reads only)."""
  directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    return None
  with _read_only_manager(directory) as manager:
    return manager.latest_step()


@contextlib.contextmanager
def _read_only_manager(directory: str):
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)  # orbax warns that a read-only manager will not save: expected here
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True), item_names=ITEMS)
  absl_logger.setLevel(level)
  try:
    yield manager
  finally:
    manager.close()


@contextlib.contextmanager
def readable(manager: ocp.CheckpointManager, step: int):
  """Turns any failure to read checkpoint `step` (a truncated or deleted file, TensorStore's errors, bad JSON)
  into a ConversionError that names the step and the run's other checkpoints, instead of orbax's tracebacks."""
  _silence_abandoned_reads()  # before the restore: orbax's own unwinding already reports some of them
  try:
    yield
    return
  except Exception as e:  # pylint: disable=broad-exception-caught  (orbax / TensorStore raise many kinds)
    directory = os.fspath(manager.directory)
    others = [s for s in manager.all_steps() if s != step]
    root = e
    while (root.__cause__ or root.__context__) is not None:  # TensorStore's own message names the tensor and file
      root = root.__cause__ or root.__context__
    cause = f"{type(root).__name__}: {(str(root).strip().splitlines() or [''])[0][:400]}"
    hint = (f"the run's other checkpoints are steps {', '.join(map(str, others))}: move {directory}/{step} aside "
            f"to use the latest of them" if others else "the run has no other checkpoint")
    message = f"checkpoint step {step} in {directory} is unreadable ({cause}); {hint}"
  raise ConversionError(message)


def _silence_abandoned_reads() -> None:
  """When one read of a restore fails, orbax gives up on the others, which end on an event loop it has closed, each
  with a traceback (an unraisable "Event loop is closed", a never-awaited orbax read, asyncio's "... exception was
  never retrieved" for the tasks and futures of TensorStore reads) around and after our one-line error. Installed
  once, for the process: those reports are dropped, any other goes on as before."""
  if getattr(sys.unraisablehook, "drops_abandoned_reads", False):
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    code = getattr(unraisable.object, "cr_code", None)
    if (isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value)
        or code is not None and "orbax" in code.co_filename):
      return
    previous(unraisable)
  hook.drops_abandoned_reads = True
  sys.unraisablehook = hook
  def keep(record) -> bool:
    message = record.getMessage()
    return not ("exception was never retrieved" in message
                and any(word in message for word in ("orbax", "TensorStore", "OCDBT")))
  logging.getLogger("asyncio").addFilter(keep)


def load_run_params(workdir: str, *, mesh=None, param_dtype: str | None = None, compute_dtype: str | None = None):
  """(config, params, step) from the latest checkpoint of a train.py workdir, placed on `mesh` if given."""
  # Imported here: convert/ knows nothing of training, and this is the one bridge between them.
  from t5x_lite.convert.checkpoint import params_restore_target  # pylint: disable=import-outside-toplevel

  with _read_only_manager(os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)) as manager:
    step, config = _latest_config(manager, workdir)
    stored_dtype = config.param_dtype
    target = params_restore_target(config, stored_dtype, mesh)
    with readable(manager, step):
      params = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]
  if param_dtype and param_dtype != stored_dtype:
    params = jax.tree.map(lambda x: x.astype(param_dtype), params)
  config = config.replace(param_dtype=param_dtype or stored_dtype, dtype=compute_dtype or config.dtype)
  return config, params, step


def read_run_config(workdir: str):
  """The model config stored with the latest checkpoint of a train.py workdir (no params read)."""
  with _read_only_manager(os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)) as manager:
    return _latest_config(manager, workdir)[1]


def _latest_config(manager: ocp.CheckpointManager, workdir: str):
  from t5x_lite.convert.checkpoint import config_from_json  # pylint: disable=import-outside-toplevel
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"{workdir}: no finished checkpoint under {CHECKPOINT_DIR}/")
  with readable(manager, step):
    config_json = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  source = os.path.join(os.fspath(manager.directory), str(step), "config")
  return step, config_from_json(json.dumps(config_json), source)
