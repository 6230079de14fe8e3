"""The training loop: init or resume, step, log, evaluate, checkpoint, survive preemption.

Everything a run needs comes in as explicit, gin-bindable arguments of `train`; the program's structure is
this file. Resume exactness: a checkpoint at step s holds the params after s updates and every process's data
iterator after s batches, and dropout keys derive from (seed, step), so a run killed and restarted (any number
of times, on one process or several) follows the uninterrupted run's trajectory exactly.

Start-up order: settings, model config and workdir checks first (they only read, see workdir.py), then the
input pipeline (it validates every document), then the workdir lock; only then is anything written or compiled.
"""

import dataclasses
import math
import os
import signal
import sys
import time

import gin
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from t5x_lite import sharding
from t5x_lite.config.fields import check_arguments
from t5x_lite.convert.checkpoint import config_from_json, config_to_json
from t5x_lite.data.pipeline import DataConfig, make_batches
from t5x_lite.models.params import axes_tree, init_params, is_spec
from t5x_lite.models.registry import family_of_config
from t5x_lite.training import optimizers, workdir as workdir_lib
from t5x_lite.training.checkpoints import (CHECKPOINT_DIR, RunCheckpoints, batch_size_refusal, latest_step,
                                           saved_data_lanes)
from t5x_lite.training.init_from import config_from_base
from t5x_lite.training.metrics import MetricsWriter, measure_matmul_peak
from t5x_lite.training.step import make_eval_step, make_train_step


class NonFiniteLoss(RuntimeError):
  """The loss became NaN or inf; the run stopped without saving the bad state."""


class _Preemption:
  """Turns SIGTERM and a first Ctrl-C (SIGINT) into a flag the loop checks between steps: save, then exit cleanly.
  A second Ctrl-C interrupts at once, without saving."""

  def __init__(self):
    self.requested = None  # the signal's name once one arrived
    self._previous = {}

  def __enter__(self):
    def handler(signum, frame):  # pylint: disable=unused-argument
      if signum == signal.SIGINT:
        if self.requested:
          raise KeyboardInterrupt
        print("\nCtrl-C: saving a checkpoint after this step, then exiting (Ctrl-C again: stop without saving)",
              file=sys.stderr)
      self.requested = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, handler)
    return self

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)


class _StopVote:
  """Makes every process stop after the same step when any of them was asked to (SIGTERM on one host of a pod).

  A signal reaches one process: stopping there alone would leave the others inside the next step's collectives (a
  hang, and the preemption checkpoint, a collective save, lost). So each step every process casts its local flag
  into a tiny all-reduce over all devices, and acts on the result of the step before: the same value everywhere, so
  all stop after the same step s (one step after the signal at most) and save it together. Reading the previous
  step's vote rather than this one's leaves one train step queued on the devices while the host waits, so the host
  never drains the device queue (a blocking vote on the current step would, each step). Its cost, two CPU processes
  of 2 devices each (gloo) on a 2-core Xeon at load 6: 4.1 ms a vote (bench/bench_stop_vote.py).
  jax.experimental.multihost_utils.reached_preemption_sync_point agrees on a step through the coordination service
  instead, but only for a preemption the runtime's own notifier saw (its SIGTERM handler, which ours replaces, and
  not Ctrl-C); orbax's preemption checks use that same service. One process: the flag itself, at once."""

  def __init__(self):
    self._pending = None
    if jax.process_count() > 1:
      mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("hosts",))
      self._flags = NamedSharding(mesh, PartitionSpec("hosts"))
      self._any = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, PartitionSpec()))

  def __call__(self, local: bool) -> bool:
    """Casts this process's flag; returns whether any process had cast True by the step before (one process: now)."""
    if jax.process_count() == 1:
      return local
    flags = np.full(jax.local_device_count(), int(local), np.int32)
    vote = self._any(jax.make_array_from_process_local_data(self._flags, flags))
    previous, self._pending = self._pending, vote
    return previous is not None and bool(previous)


def _global_batch(local: dict, mesh) -> dict:
  """This host's rows -> global arrays sharded over the batch axes of `mesh`."""
  out = {}
  for k, v in local.items():
    spec = sharding.logical_to_spec(("act_batch",) + (None,) * (v.ndim - 1),
                                    (v.shape[0] * jax.process_count(),) + v.shape[1:], dict(mesh.shape))
    out[k] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), np.asarray(v))
  return out


def _check_settings(settings: dict) -> None:
  """ValueError naming the first setting of `train` with a wrong type or out of its range (a quoted number, a
  zero save interval or a negative step count would otherwise fail mid-run or claim a checkpoint never made)."""
  check_arguments("train", settings, train)
  for name in ("train_steps", "save_every", "keep_checkpoints", "log_every", "eval_steps", "accumulation_steps"):
    if settings[name] < 1:
      raise ValueError(f"train.{name} must be >= 1, got {settings[name]}")
  for name in ("eval_every", "label_smoothing", "z_loss"):
    if settings[name] < 0:
      raise ValueError(f"train.{name} must be >= 0, got {settings[name]}")


@gin.configurable(denylist=["workdir", "documents", "eval_documents", "tokenizer", "tokenizer_files", "processor"])
def train(workdir: str, *, model=gin.REQUIRED, data: DataConfig = gin.REQUIRED, tokenizer=None, processor=None,
          documents=None, eval_documents=None, tokenizer_files: dict[str, bytes] | None = None,
          train_steps: int = gin.REQUIRED, save_every: int = 100, keep_checkpoints: int = 3, log_every: int = 10,
          eval_every: int = 0, eval_steps: int = 4, seed: int = 0, mesh_spec: str = "", optimizer: str = "adafactor",
          schedule: str = "rsqrt", label_smoothing: float = 0.0, z_loss: float = 1e-4, accumulation_steps: int = 1,
          init_params_from: str | None = None, frozen: tuple[str, ...] | str = (), async_checkpoints: bool = True,
          progress: bool = True, allow_batch_size_change: bool = False) -> dict:
  """Trains `model` (a T5Config / GemmaConfig) on `data` until `train_steps`, resuming from WORKDIR.

  `tokenizer` and `documents` come from the caller (train.py builds them: a corpus file, or the demo's
  standard-library docstrings), and `processor` (t5x_lite.vision) for image data (DataConfig.max_images);
  `tokenizer_files` (name -> bytes, from `tokenizer_dir`) are written into the workdir so that it loads as a model, and a resumed run must bring the same ones. `init_params_from` fine-tunes
  from an HF or t5x_lite checkpoint (or a workdir), whose own config is the model (init_from.py). `frozen`: paths
  of the params tree that keep their values ("vision" and "projector": T5Gemma 2's image path).
  A run resumes on any device and process count (orbax reads the state into this run's mesh; the data position is
  kept per row of the global batch, checkpoints.saved_data_lanes) as long as the global batch is the same:
  `allow_batch_size_change` accepts another one (pipeline.rebatched_lanes: some documents are read again).
  Returns the last logged metrics, with "preempted": True when SIGTERM / Ctrl-C ended the run early (after saving).
  """
  settings = dict(train_steps=train_steps, save_every=save_every, keep_checkpoints=keep_checkpoints,
                  log_every=log_every, eval_every=eval_every, eval_steps=eval_steps, seed=seed, mesh_spec=mesh_spec,
                  optimizer=optimizer, schedule=schedule, label_smoothing=label_smoothing, z_loss=z_loss,
                  accumulation_steps=accumulation_steps, init_params_from=init_params_from,
                  frozen=(frozen,) if isinstance(frozen, str) else tuple(frozen),
                  async_checkpoints=async_checkpoints, progress=progress,
                  allow_batch_size_change=allow_batch_size_change)
  _check_settings(settings)
  tokenizer_files = tokenizer_files or {}
  start = latest_step(workdir)
  config = _model_config(model, workdir, start, init_params_from)
  tokenizer_ids = getattr(tokenizer, "vocab_size", 0)  # a test's stand-in tokenizer may not say
  if tokenizer_ids > config.vocab_size:
    raise ValueError(f"the tokenizer has {tokenizer_ids} ids but the model's vocab_size is {config.vocab_size}: "
                     "ids past it would index outside the embedding")
  if config.is_encoder_decoder and data.start_id != config.decoder_start_token_id:
    raise ValueError(f"DataConfig.start_id is {data.start_id} but the model's decoder starts from "
                     f"{config.decoder_start_token_id}: bind DataConfig.start_id = {config.decoder_start_token_id}")
  if data.max_images and family_of_config(config).image_rows is None:
    raise ValueError(f"DataConfig.max_images is {data.max_images}, but this {config.family} model reads no images")
  config_json = config_to_json(config)
  fingerprint = workdir_lib.corpus_fingerprint(documents) if documents is not None else None
  if start is not None:
    workdir_lib.check_same_model(workdir, config_json)
    saved_batch_size = len(saved_data_lanes(os.path.join(workdir, CHECKPOINT_DIR), start))
    if saved_batch_size != data.batch_size and not allow_batch_size_change:
      raise batch_size_refusal(os.path.join(workdir, CHECKPOINT_DIR), start, saved_batch_size, data.batch_size)
    workdir_lib.check_same_tokenizer(workdir, tokenizer_files, "the run's tokenizer_dir")
    if fingerprint is not None and jax.process_index() == 0:
      workdir_lib.warn_if_other_corpus(workdir, fingerprint)
    fingerprint = None  # the first start's stays
  mesh = sharding.make_mesh(mesh_spec or f"data:{jax.device_count()}")
  specs = family_of_config(config).param_specs(config)
  # Checks the optimizer's and schedule's settings; Adafactor factors over the parameters' logical axes.
  opt, sched = optimizers.make_optimizer(optimizer, schedule, param_axes=axes_tree(specs))
  frozen = settings["frozen"]
  labels = optimizers.frozen_labels(specs, frozen) if frozen else None
  if labels is not None:
    opt = optimizers.with_frozen(opt, labels)
  batches = make_batches(data, tokenizer, documents=documents, processor=processor)  # checks every document
  loop_settings = {k: v for k, v in settings.items() if k not in ("mesh_spec", "optimizer", "schedule", "frozen")}
  try:
    with workdir_lib.run_lock(workdir):
      workdir_lib.write_run_files(workdir, config_json=config_json, gin_config=gin.config_str(),
                                  tokenizer_files=tokenizer_files, fingerprint=fingerprint)
      return _train_locked(workdir, config, config_json, data, batches, tokenizer, eval_documents, start, mesh=mesh,
                           opt=opt, sched=sched, frozen_labels=labels, **loop_settings)
  finally:
    if hasattr(batches, "close"):
      batches.close()


def _model_config(model, workdir: str, start: int | None, init_params_from: str | None):
  """The model to train: `model`, or with `init_params_from` the base checkpoint's config (on a resume, the run's
  own stored config, so that a restart needs no base checkpoint) with the changes `model` may make."""
  if not init_params_from:
    return model
  stored = workdir_lib.stored_model_config(workdir) if start is not None else None
  if stored is not None:
    return config_from_base(model, config_from_json(stored, os.path.join(workdir, workdir_lib.MODEL_CONFIG_FILE)),
                            init_params_from)
  from t5x_lite.model import read_config  # pylint: disable=import-outside-toplevel
  return config_from_base(model, read_config(init_params_from), init_params_from)


def _train_locked(workdir: str, config, config_json: str, data: DataConfig, batches, tokenizer, eval_documents,
                  start: int | None, *, mesh, opt, sched, frozen_labels, train_steps: int, save_every: int, keep_checkpoints: int,
                  log_every: int, eval_every: int, eval_steps: int, seed: int, label_smoothing: float, z_loss: float,
                  accumulation_steps: int, init_params_from: str | None, async_checkpoints: bool,
                  progress: bool, allow_batch_size_change: bool) -> dict:
  """`train` once the run is accepted and holds the workdir."""
  family = family_of_config(config)
  specs = family.param_specs(config)
  param_shardings = sharding.tree_shardings(mesh, axes_tree(specs), specs)
  # The whole state is placed explicitly: params by the logical-axis rules, the optimizer state following its
  # params (sharding.follow_params), the step count replicated. One compiled program builds it from params, the
  # train step keeps it where it is (one compile, no resharding), and resuming restores straight into it, so
  # neither the initial params nor an `init_params_from` checkpoint is materialised next to the restored one.
  param_dtype = jnp.dtype(config.param_dtype)
  abstract_params = jax.tree.map(lambda spec, s: jax.ShapeDtypeStruct(spec.shape, param_dtype, sharding=s),
                                 specs, param_shardings, is_leaf=is_spec)
  state_shardings = {"step": NamedSharding(mesh, PartitionSpec()), "params": param_shardings,
                     "opt_state": sharding.follow_params(jax.eval_shape(opt.init, abstract_params), abstract_params)}
  make_state = jax.jit(lambda p: {"step": jnp.int32(0), "params": p, "opt_state": opt.init(p)},
                       out_shardings=state_shardings).lower(abstract_params).compile()
  abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                make_state.out_info, make_state.output_shardings)
  train_step = jax.jit(make_train_step(config, opt, sched, label_smoothing=label_smoothing, z_loss=z_loss,
                                       accumulation_steps=accumulation_steps, frozen_labels=frozen_labels),
                       out_shardings=(state_shardings, None), donate_argnums=(0,))
  eval_step = jax.jit(make_eval_step(config))

  def fresh_state():
    if init_params_from:
      from t5x_lite.model import load  # pylint: disable=import-outside-toplevel
      # The config is the checkpoint's own (init_from.py), so its tensors have the shapes load() checked.
      params = load(init_params_from, dtype=config.dtype, param_dtype=config.param_dtype, mesh=mesh,
                    progress=progress).params
      params = jax.device_put(params, param_shardings)  # the placement make_state was compiled for
    else:
      init = jax.jit(lambda key: init_params(specs, key, param_dtype), out_shardings=param_shardings)
      params = init(jax.random.key(seed))
    return make_state(params)

  checkpoints = RunCheckpoints(workdir, save_every=save_every, keep=keep_checkpoints, async_save=async_checkpoints)
  writer = None
  try:
    with jax.set_mesh(mesh):
      if start is None:
        if jax.process_index() == 0:  # a fine-tuning config run without its base checkpoint would train from scratch
          print(f"{workdir}: starting at step 0 from "
                f"{init_params_from if init_params_from else f'a random initialisation (seed {seed})'}",
                file=sys.stderr)
        state = fresh_state()
      else:
        restored = checkpoints.restore(start, abstract_state, batches, allow_batch_size_change=allow_batch_size_change)
        state = {"step": jnp.int32(start), "params": restored["params"], "opt_state": restored["opt_state"]}
        if jax.process_index() == 0:
          print(f"{workdir}: resuming from the checkpoint of step {start}", file=sys.stderr)
    start = start or 0
    if start >= train_steps:
      print(f"{workdir}: the latest checkpoint is at step {start} and train_steps is {train_steps}: nothing to "
            f"train (raise train_steps to go on)", file=sys.stderr)
    writer = MetricsWriter(workdir, resume_step=start)
    loop = _Loop(config, checkpoints, writer, log_every=log_every, save_every=save_every, start=start,
                 train_steps=train_steps, progress=progress)
    stop = None
    vote = _StopVote()
    with _Preemption() as preemption, jax.set_mesh(mesh), loop:
      for step in range(start + 1, train_steps + 1):
        local = next(batches)
        key = jax.random.fold_in(jax.random.key(seed), step) if getattr(config, "dropout_rate", 0) else None
        batch = _global_batch(local, mesh)
        state, metrics = train_step(state, batch, key)
        # Read once: a signal landing later is handled after the next step. Every process gets the same answer.
        if vote(bool(preemption.requested)):
          stop = preemption.requested or "a stop requested on another process (SIGTERM or Ctrl-C there)"
        loop.after_step(step, local, batch, metrics, stop=bool(stop))
        if eval_every and eval_documents and step % eval_every == 0:
          writer.write(step, evaluate(eval_step, state["params"], data, tokenizer, eval_documents, eval_steps, mesh),
                       prefix="eval")
        if step % save_every == 0 or step == train_steps or stop:
          checkpoints.save(step, state, batches, config_json, force=True)
        if stop:
          print(f"{stop}: saved step {step}, exiting", file=sys.stderr)
          break
    return {**loop.last, "preempted": bool(stop)}
  finally:
    checkpoints.close()
    if writer is not None:
      writer.close()


class _Loop:
  """Per-step bookkeeping between device and host: sums the step metrics on device over each logging window (no
  host sync per step), checks finiteness only at log and save steps, and writes the window's means."""

  def __init__(self, config, checkpoints: RunCheckpoints, writer: MetricsWriter, *, log_every: int,
               save_every: int, start: int, train_steps: int, progress: bool):
    self._checkpoints, self._writer = checkpoints, writer
    self._log_every, self._save_every, self._train_steps = log_every, save_every, train_steps
    self._flops_of_batch = batch_flops_fn(config)
    self._peak = measure_matmul_peak()
    self._bar = tqdm(total=train_steps, initial=start, desc="train", unit="step",
                     disable=not progress or jax.process_index())
    self.last = {}
    self._nonfinite = jnp.bool_(False)  # sticky on device
    self._reset_window()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._bar.close()  # before an error message, so that it starts on its own line

  def _reset_window(self):
    self._sums, self._steps, self._tokens, self._flops, self._checksum = None, 0, 0.0, 0.0, jnp.uint32(0)
    self._window_start = time.perf_counter()

  def after_step(self, step: int, local: dict, batch: dict, metrics: dict, *, stop: bool) -> None:
    """`local`: this process's rows of the step's batch; `batch`: the global batch (arrays over all processes)."""
    self._tokens += float(np.sum(batch_weights(local))) * jax.process_count()
    self._flops += self._flops_of_batch(local) * jax.process_count()
    # data_checksum folds in the global batches since the last log line, on device: with log_every=1, equal values
    # at a step mean the same examples in the same order at that step, whatever the process or device count.
    self._checksum = _fold_checksum(self._checksum, batch["input_ids"])
    self._nonfinite = self._nonfinite | ~jnp.isfinite(metrics["loss"]) | ~metrics.pop("params_finite")
    learning_rate = metrics.pop("learning_rate")
    self._sums = metrics if self._sums is None else jax.tree.map(jnp.add, self._sums, metrics)
    self._steps += 1
    is_log = step % self._log_every == 0 or step == self._train_steps
    if (is_log or step % self._save_every == 0 or stop) and bool(self._nonfinite):
      saved = self._checkpoints.latest_step()
      raise NonFiniteLoss(f"loss (or params) became NaN/inf at or before step {step}; stopped without saving ("
                          + (f"last good checkpoint: step {saved})" if saved is not None else "no checkpoint was "
                             "saved before it)"))
    if is_log:
      elapsed = max(time.perf_counter() - self._window_start, 1e-9)
      # Means over the window's steps, as T5X logs them; the learning rate is the step's own.
      self.last = {k: float(v) / self._steps for k, v in self._sums.items()}
      self.last.update(learning_rate=float(learning_rate), tokens_per_sec=self._tokens / elapsed,
                       mfu=self._flops / elapsed / self._peak, data_checksum=int(self._checksum))
      self._writer.write(step, self.last)
      self._bar.set_postfix(loss=f"{self.last['loss']:.3f}", tok_s=f"{self.last['tokens_per_sec']:.0f}")
      self._reset_window()
    self._bar.update(1)


def data_checksum(input_ids_BL: jax.Array) -> jax.Array:
  """A cheap fingerprint of a global batch's token ids (order-sensitive), uint32. The same for any sharding and any
  number of processes: uint32 products and sums wrap modulo 2**32, so the order of the reduction cannot change it."""
  rows = jax.lax.broadcasted_iota(jnp.uint32, input_ids_BL.shape, 0)
  cols = jax.lax.broadcasted_iota(jnp.uint32, input_ids_BL.shape, 1)
  weights = (rows * jnp.uint32(input_ids_BL.shape[1]) + cols) % 9973 + 1
  return jnp.sum(input_ids_BL.astype(jnp.uint32) * weights, dtype=jnp.uint32)


@jax.jit
def _fold_checksum(previous: jax.Array, input_ids_BL: jax.Array) -> jax.Array:
  return previous * jnp.uint32(31) + data_checksum(input_ids_BL)


def batch_flops_fn(config):
  """flops(local batch): 3 x the forward FLOPs of every real token (forward + backward), each counted in the stack
  it passes (the family's forward_flops_per_token, keyed by the batch's segment-id features)."""
  per_token = family_of_config(config).forward_flops_per_token(config)
  return lambda b: 3.0 * sum(flops * float(np.sum(np.asarray(b[key]) > 0)) for key, flops in per_token.items())


def batch_weights(batch: dict):
  return batch["decoder_loss_weights"] if "decoder_loss_weights" in batch else batch["loss_weights"]


def evaluate(eval_step, params, data: DataConfig, tokenizer, documents, steps: int, mesh) -> dict:
  """Mean loss and token accuracy over `steps` batches of the held-out documents (same packing)."""
  config = dataclasses.replace(data, seed=data.seed + 1, num_epochs=None)
  it = make_batches(config, tokenizer, documents=documents)
  totals = {"loss": 0.0, "correct": 0.0, "weight_sum": 0.0}
  for _ in range(steps):
    out = eval_step(params, _global_batch(next(it), mesh))
    for k in totals:
      totals[k] += float(out[k])
  if hasattr(it, "close"):
    it.close()
  denom = max(totals["weight_sum"], 1.0)
  return {"loss": totals["loss"] / denom, "accuracy": totals["correct"] / denom,
          "perplexity": math.exp(min(totals["loss"] / denom, 50.0))}
