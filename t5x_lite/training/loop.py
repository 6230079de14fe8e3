"""The training loop: init or resume, step, log, evaluate, checkpoint, survive preemption.

Everything a run needs comes in as explicit, gin-bindable arguments of `train`; the program's structure is
this file. Resume exactness: a checkpoint at step s holds the params after s updates and the data iterator
after s batches, and dropout keys derive from (seed, step), so a run killed and restarted (any number of
times) follows the uninterrupted run's trajectory exactly.
"""

import dataclasses
import json
import math
import os
import signal
import sys
import time

import gin
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from tqdm import tqdm

from t5x_lite import sharding
from t5x_lite.convert.checkpoint import config_to_json
from t5x_lite.convert.families import family_of_config
from t5x_lite.data.pipeline import DataConfig, make_batches
from t5x_lite.models.params import axes_tree, init_params, is_spec
from t5x_lite.training import optimizers
from t5x_lite.training.checkpoints import RunCheckpoints
from t5x_lite.training.metrics import MetricsWriter, measure_matmul_peak
from t5x_lite.training.step import make_eval_step, make_train_step


class NonFiniteLoss(RuntimeError):
  """The loss became NaN or inf; the run stopped without saving the bad state."""


class _Preemption:
  """Turns SIGTERM into a flag the loop checks between steps (save, then exit cleanly)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    def handler(signum, frame):  # pylint: disable=unused-argument
      self.requested = True
    self._previous = signal.signal(signal.SIGTERM, handler)
    return self

  def __exit__(self, *exc):
    signal.signal(signal.SIGTERM, self._previous)


def _global_batch(local: dict, mesh) -> dict:
  """This host's rows -> global arrays sharded over the batch axes of `mesh`."""
  out = {}
  for k, v in local.items():
    spec = sharding.logical_to_spec(("act_batch",) + (None,) * (v.ndim - 1),
                                    (v.shape[0] * jax.process_count(),) + v.shape[1:], dict(mesh.shape))
    out[k] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), np.asarray(v))
  return out


# Model config fields a resumed run may change: how the model computes, not what it computes.
RESUMABLE_CHANGES = ("dtype", "remat", "dropout_rate", "classifier_dropout")


def check_same_model(workdir: str, config_json: str) -> None:
  """ValueError when the run in `workdir` (its model_config.json) trained another model than `config_json`.

  Without it a resumed run with, say, another activation would go on silently with weights trained for the old
  one, and one with other shapes would fail inside orbax's restore without naming the cause.
  """
  path = os.path.join(workdir, "model_config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    before = json.load(f)
  now = json.loads(config_json)
  changed = [k for k in sorted(set(before["config"]) | set(now["config"]))
             if k not in RESUMABLE_CHANGES and before["config"].get(k) != now["config"].get(k)]
  if before["family"] != now["family"] or changed:
    diffs = "; ".join(f"{k}: {before['config'].get(k)!r} -> {now['config'].get(k)!r}" for k in changed[:5])
    raise ValueError(f"{workdir} holds a run of another model ({diffs or before['family'] + ' -> ' + now['family']})"
                     f": resume it with its own configuration ({path}), or give a new --workdir")


@gin.configurable(denylist=["workdir", "documents", "eval_documents", "tokenizer"])
def train(workdir: str, *, model=gin.REQUIRED, data: DataConfig = gin.REQUIRED, tokenizer=None,
          documents=None, eval_documents=None, train_steps: int = gin.REQUIRED, save_every: int = 100,
          keep_checkpoints: int = 3, log_every: int = 10, eval_every: int = 0, eval_steps: int = 4,
          seed: int = 0, mesh_spec: str = "", optimizer: str = "adafactor", schedule: str = "rsqrt",
          label_smoothing: float = 0.0, z_loss: float = 1e-4, accumulation_steps: int = 1,
          init_params_from: str | None = None, async_checkpoints: bool = True, progress: bool = True) -> dict:
  """Trains `model` (a T5Config / GemmaConfig) on `data` until `train_steps`, resuming from WORKDIR.

  `tokenizer` and `documents` come from the caller (train.py builds them: a corpus file, or the demo's
  standard-library docstrings). `init_params_from` fine-tunes from an HF or t5x_lite checkpoint.
  Returns the last logged metrics, with "preempted": True when SIGTERM ended the run early (after saving).
  """
  os.makedirs(workdir, exist_ok=True)
  config = model
  tokenizer_ids = getattr(tokenizer, "vocab_size", 0)  # a test's stand-in tokenizer may not say
  if tokenizer_ids > config.vocab_size:
    raise ValueError(f"the tokenizer has {tokenizer_ids} ids but the model's vocab_size is {config.vocab_size}: "
                     "ids past it would index outside the embedding")
  mesh = sharding.make_mesh(mesh_spec or f"data:{jax.device_count()}")
  family = family_of_config(config)
  specs = family.model.param_specs(config)
  param_shardings = sharding.tree_shardings(mesh, axes_tree(specs), specs)
  opt, sched = optimizers.make_optimizer(optimizer, schedule)
  train_step = jax.jit(make_train_step(config, opt, sched, label_smoothing=label_smoothing, z_loss=z_loss,
                                       accumulation_steps=accumulation_steps), donate_argnums=(0,))
  eval_step = jax.jit(make_eval_step(config))

  # One compiled program builds the whole state from params; its output shardings are the opt_state's
  # placement (sharding propagation decides it, e.g. for Adafactor's factored moments). Resuming restores straight
  # into that abstract state, so neither the initial params nor an `init_params_from` checkpoint is materialised
  # next to the restored one (that doubled the start-up memory and loaded the base model on every restart).
  param_dtype = jnp.dtype(config.param_dtype)
  abstract_params = jax.tree.map(lambda spec, s: jax.ShapeDtypeStruct(spec.shape, param_dtype, sharding=s),
                                 specs, param_shardings, is_leaf=is_spec)
  make_state = jax.jit(lambda p: {"step": jnp.int32(0), "params": p, "opt_state": opt.init(p)}).lower(
      abstract_params).compile()
  abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                make_state.out_info, make_state.output_shardings)

  def fresh_state():
    if init_params_from:
      from t5x_lite.model import load  # pylint: disable=import-outside-toplevel
      params = load(init_params_from, dtype=config.dtype, param_dtype=config.param_dtype, mesh=mesh,
                    progress=progress).params
      check_params_match(params, abstract_params, init_params_from)
      params = jax.device_put(params, param_shardings)  # the placement make_state was compiled for
    else:
      init = jax.jit(lambda key: init_params(specs, key, param_dtype), out_shardings=param_shardings)
      params = init(jax.random.key(seed))
    return make_state(params)

  checkpoints = RunCheckpoints(workdir, save_every=save_every, keep=keep_checkpoints, async_save=async_checkpoints)
  config_json = config_to_json(config)
  batches = make_batches(data, tokenizer, documents=documents)
  with jax.set_mesh(mesh):
    start = checkpoints.latest_step()
    if start is not None:
      check_same_model(workdir, config_json)
    if start is None:
      if jax.process_index() == 0:  # a fine-tuning config run without its base checkpoint would train from scratch
        print(f"{workdir}: starting at step 0 from "
              f"{init_params_from if init_params_from else f'a random initialisation (seed {seed})'}", file=sys.stderr)
      state = fresh_state()
    else:
      restored = checkpoints.restore(start, abstract_state, batches)
      state = {"step": jnp.int32(start), "params": restored["params"], "opt_state": restored["opt_state"]}
      if jax.process_index() == 0:
        print(f"{workdir}: resuming from the checkpoint of step {start}", file=sys.stderr)
    start = start or 0
  if start >= train_steps:
    print(f"{workdir}: the latest checkpoint is at step {start} and train_steps is {train_steps}: nothing to train "
          f"(raise train_steps to go on)", file=sys.stderr)
  with open(os.path.join(workdir, "config.gin"), "w") as f:  # the fully resolved configuration, as T5X does
    f.write(gin.config_str())
  with open(os.path.join(workdir, "model_config.json"), "w") as f:
    f.write(config_json + "\n")

  writer = MetricsWriter(workdir)
  peak = measure_matmul_peak()
  flops_of_batch = batch_flops_fn(config, specs)
  last = {}
  bar = tqdm(total=train_steps, initial=start, desc="train", unit="step", disable=not progress or jax.process_index())
  window_tokens = window_flops = 0.0
  window_start = time.perf_counter()
  checksum = 0
  preempted = False
  nonfinite = jnp.bool_(False)  # sticky on device; read only at log and save steps (no per-step host sync)
  try:
    with _Preemption() as preemption, jax.set_mesh(mesh):
      for step in range(start + 1, train_steps + 1):
        local = next(batches)
        window_tokens += float(np.sum(batch_weights(local))) * jax.process_count()
        window_flops += flops_of_batch(local) * jax.process_count()
        checksum = (checksum * 31 + data_checksum(local)) % (1 << 31)
        key = jax.random.fold_in(jax.random.key(seed), step) if getattr(config, "dropout_rate", 0) else None
        state, metrics = train_step(state, _global_batch(local, mesh), key)
        nonfinite = nonfinite | ~jnp.isfinite(metrics["loss"]) | ~metrics.pop("params_finite")
        is_log = step % log_every == 0 or step == train_steps
        is_save = step % save_every == 0 or step == train_steps
        stop = preemption.requested  # read once: a SIGTERM landing later is handled after the next step
        if is_log or is_save or stop:
          if bool(nonfinite):
            raise NonFiniteLoss(f"loss (or params) became NaN/inf at or before step {step}; stopped without saving "
                                f"(last good checkpoint: step {checkpoints.latest_step()})")
        if is_log:
          elapsed = time.perf_counter() - window_start
          tokens_per_sec = window_tokens / max(elapsed, 1e-9)
          last = {k: float(v) for k, v in metrics.items()}
          # data_checksum folds in this process's batches since the last log line: with log_every=1, equal
          # values at a step mean the same examples in the same order at that step.
          last.update(tokens_per_sec=tokens_per_sec, mfu=window_flops / max(elapsed, 1e-9) / peak,
                      data_checksum=checksum)
          writer.write(step, last)
          bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{tokens_per_sec:.0f}")
          window_tokens = window_flops = 0.0
          checksum = 0
          window_start = time.perf_counter()
        if eval_every and eval_documents and step % eval_every == 0:
          writer.write(step, evaluate(eval_step, state["params"], data, tokenizer, eval_documents, eval_steps, mesh),
                       prefix="eval")
        if is_save or stop:
          checkpoints.save(step, state, batches, config_json, force=True)
        bar.update(1)
        if stop:
          preempted = True
          print(f"SIGTERM: saved step {step}, exiting", file=sys.stderr)
          break
  finally:
    bar.close()
    checkpoints.close()
    writer.close()
    if hasattr(batches, "close"):
      batches.close()
  return {**last, "preempted": preempted}


def check_params_match(params, expected, source: str) -> None:
  """ValueError naming the first tensor whose presence or shape differs from the configured model's."""
  got = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(params)}
  want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(expected)}
  for key in sorted(got.keys() | want.keys()):
    if got.get(key) != want.get(key):
      raise ValueError(f"init_params_from={source}: params{key} is {got.get(key, 'missing')} in the checkpoint but "
                       f"{want.get(key, 'absent')} in the configured model; bind the checkpoint's shape "
                       f"(configs/models/*.gin or T5Config/GemmaConfig)")


def data_checksum(local: dict) -> int:
  """A cheap fingerprint of a batch's token ids (order-sensitive)."""
  ids = np.asarray(local["input_ids"], np.int64).ravel()
  return int(np.sum(ids * (np.arange(ids.size) % 9973 + 1)) % (1 << 31))


def batch_flops_fn(config, specs):
  """flops(local batch): 6 x params x tokens for the stack each token passes (encoder tokens through the
  encoder, decoder tokens through the decoder and head); attention scores are left out."""
  from t5x_lite.models.params import count_params as count  # pylint: disable=import-outside-toplevel
  if config.family == "t5":
    n_enc = count(specs["encoder"])
    n_dec = count(specs) - n_enc - count(specs["embed"]) + (count(specs["embed"]) if config.tie_lm_head else 0)
    return lambda b: 6.0 * (n_enc * float(np.sum(np.asarray(b["encoder_segment_ids"]) > 0))
                            + n_dec * float(np.sum(np.asarray(b["decoder_segment_ids"]) > 0)))
  n = count(specs) - (0 if config.tie_lm_head else count(specs["embed"]))
  return lambda b: 6.0 * n * float(np.sum(np.asarray(b["segment_ids"]) > 0))


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


def write_json(path: str, obj) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)
