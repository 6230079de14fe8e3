"""What a run costs before it runs: parameters, FLOPs per token and per-device memory, as one JSON object.

  python -m t5x_lite.inspect CONFIG.gin [--gin.BINDING=VALUE ...] [--mesh SPEC] [--device_memory 16GiB]

CONFIG.gin is a run file (configs/runs/*.gin: train.model, train.data, train.mesh_spec, train.optimizer, ...) or a
model file (configs/models/*.gin) with the rest bound on the command line (`--gin.DataConfig.batch_size=256`).
Nothing is allocated, traced or compiled, and the mesh is abstract: `--mesh fsdp:64` needs no 64 devices. Prints
  params           the parameter count, from the family's specs
  flops_per_token  forward: forward FLOPs per position of a batch row (the family's forward_flops_per_token,
                   averaged over the row's encoder and decoder positions); train: 3 x forward
  per_device_bytes params, optimizer (its state's shapes from jax.eval_shape(opt.init), placed as the train loop
                   places it: sharding.follow_params), gradients (the trained params' shards; twice with
                   gradient accumulation: the accumulator and a microbatch's), activations (training/memory.py's
                   estimate for the microbatch's rows on one device and the model's remat), total
  fits             total <= --device_memory, or null without it
and, beside them, what they were computed for (mesh, batch, optimizer, remat, the activation breakdown).
Mistakes (a missing gin file, a binding of nothing, a bad mesh or memory size) exit 2 with one `error:` line.
"""

import argparse
import importlib
import inspect as py_inspect
import json
import math
import re
import sys

_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_bytes(text: str) -> int:
  """'16GiB' -> 17179869184, '80GB' -> 80000000000, '1024' -> 1024. ValueError naming the text otherwise."""
  match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b)?\s*", text.lower())
  if not match or (match.group(2) or "") not in _UNITS:
    raise ValueError(f"--device_memory {text!r}: give a size such as 16GiB, 80GB or 1024 (bytes)")
  return int(float(match.group(1)) * _UNITS[match.group(2) or ""])


def parse_args(argv):
  from t5x_lite.training.gin_files import split_gin_flags  # pylint: disable=import-outside-toplevel  (no JAX)
  bindings, rest = split_gin_flags(argv)
  p = argparse.ArgumentParser(prog="python -m t5x_lite.inspect", description=__doc__.split("\n")[0])
  p.add_argument("gin_files", nargs="+", metavar="CONFIG.gin", help="run or model gin file(s)")
  p.add_argument("--mesh", default=None, help="mesh spec, e.g. fsdp:64 (default: train.mesh_spec, else 1 device)")
  p.add_argument("--device_memory", default=None, help="per-device memory, e.g. 16GiB, to say whether it fits")
  return p.parse_args(rest), bindings


def _bound(selector: str, default):
  """The value gin binds to `selector` (references evaluated), else `default`."""
  import gin  # pylint: disable=import-outside-toplevel
  try:
    value = gin.query_parameter(selector)
  except ValueError:
    return default
  if isinstance(value, gin.config.ConfigurableReference):
    return value.scoped_configurable_fn() if value.evaluate else value.scoped_configurable_fn
  return value


def _model_config(train_defaults: dict):
  """The model the gin files describe: train.model; else the one family config class they bind (a model file);
  with train.init_params_from, the base checkpoint's config with the changes train.model makes (as train does)."""
  import gin  # pylint: disable=import-outside-toplevel
  from t5x_lite.models.registry import FAMILIES  # pylint: disable=import-outside-toplevel
  model = _bound("train.model", None)
  if model is None:
    bound = [f.config_class for f in FAMILIES.values() if gin.get_bindings(f.config_class)]
    if len(bound) != 1:
      names = [c.__name__ for c in bound] or [f.config_class.__name__ for f in FAMILIES.values()]
      raise ValueError(f"the gin files bind {'none' if not bound else 'several'} of the model configs {names}: "
                       "name the model, e.g. --gin.train.model=@T5Config()")
    model = bound[0]()
  init_from = _bound("train.init_params_from", train_defaults["init_params_from"])
  if init_from:
    from t5x_lite.model import read_config  # pylint: disable=import-outside-toplevel
    from t5x_lite.training.init_from import config_from_base  # pylint: disable=import-outside-toplevel
    model = config_from_base(model, read_config(init_from), init_from)
  return model


def inspect_run(mesh_spec: str | None = None, device_memory: int | None = None) -> dict:
  """The report for the gin configuration parsed now (see the module docstring)."""
  import gin  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jax.sharding import AbstractMesh, NamedSharding  # pylint: disable=import-outside-toplevel

  from t5x_lite import sharding  # pylint: disable=import-outside-toplevel
  from t5x_lite.models.params import axes_tree, count_params, is_spec  # pylint: disable=import-outside-toplevel
  from t5x_lite.models.registry import family_of_config  # pylint: disable=import-outside-toplevel
  from t5x_lite.training import memory, optimizers  # pylint: disable=import-outside-toplevel
  from t5x_lite.training.loop import train  # pylint: disable=import-outside-toplevel

  defaults = {name: p.default for name, p in py_inspect.signature(train).parameters.items()}
  setting = lambda name: _bound(f"train.{name}", defaults[name])  # noqa: E731
  config = _model_config(defaults)
  family = family_of_config(config)
  data = _bound("train.data", None) or gin.get_configurable("DataConfig")()
  mesh_spec = mesh_spec if mesh_spec is not None else setting("mesh_spec") or ""
  mesh_shape = sharding.parse_mesh_spec(mesh_spec)
  mesh = AbstractMesh(tuple(mesh_shape[a] for a in sharding.MESH_AXES), sharding.MESH_AXES)
  accumulation = setting("accumulation_steps")
  frozen = setting("frozen")
  frozen = (frozen,) if isinstance(frozen, str) else tuple(frozen)
  optimizer_name, schedule = setting("optimizer"), setting("schedule")

  specs = family.param_specs(config)
  axes = axes_tree(specs)
  param_dtype = jnp.dtype(config.param_dtype)
  params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(
      s.shape, param_dtype, sharding=NamedSharding(mesh, sharding.logical_to_spec(s.axes, s.shape, mesh_shape))),
      specs, is_leaf=is_spec)
  param_shardings = jax.tree.map(lambda p: p.sharding, params)
  opt, _ = optimizers.make_optimizer(optimizer_name, schedule, param_axes=axes)
  labels = optimizers.frozen_labels(specs, frozen) if frozen else None
  if labels is not None:
    opt = optimizers.with_frozen(opt, labels)
  opt_state = jax.eval_shape(opt.init, params)
  trained = params if labels is None else jax.tree.map(lambda p, label: p if label == "trained" else None, params,
                                                       labels)
  trained_shardings = jax.tree.map(lambda p: p.sharding, trained)

  # Lengths of a batch row, keyed as the batch's segment-id features (the keys of forward_flops_per_token).
  lengths = ({"encoder_segment_ids": data.inputs_length, "decoder_segment_ids": data.targets_length}
             if config.is_encoder_decoder else {"segment_ids": data.length})
  if data.batch_size % accumulation:
    raise ValueError(f"DataConfig.batch_size {data.batch_size} is not a multiple of train.accumulation_steps "
                     f"{accumulation}")
  micro = data.batch_size // accumulation
  batch_spec = sharding.logical_to_spec(("act_batch",), (micro,), mesh_shape)[0]
  batch_split = math.prod(mesh_shape[a] for a in ((batch_spec,) if isinstance(batch_spec, str) else batch_spec or ()))
  rows = -(-micro // batch_split)
  stacks = family.activation_stacks(config, {**lengths, "images": data.max_images})
  activations = memory.activation_bytes(
      stacks, rows=rows, remat=config.remat, dtype_bytes=jnp.dtype(config.dtype).itemsize,
      tensor=mesh_shape["tensor"], logits_positions=lengths["decoder_segment_ids" if config.is_encoder_decoder
                                                           else "segment_ids"], vocab=config.vocab_size,
      frozen=frozen)

  per_device = {
      "params": memory.tree_bytes_per_device(params, param_shardings),
      "optimizer": memory.tree_bytes_per_device(opt_state, sharding.follow_params(opt_state, params)),
      "gradients": memory.tree_bytes_per_device(trained, trained_shardings) * (2 if accumulation > 1 else 1),
      "activations": activations["total"],
  }
  per_device["total"] = sum(per_device.values())
  per_token = family.forward_flops_per_token(config)
  forward = sum(per_token[k] * n for k, n in lengths.items()) / sum(lengths.values())
  return {
      "params": count_params(specs),
      "flops_per_token": {"train": 3.0 * forward, "forward": forward},
      "per_device_bytes": per_device,
      "fits": None if device_memory is None else per_device["total"] <= device_memory,
      "device_memory": device_memory,
      "mesh": mesh_shape,
      "devices": math.prod(mesh_shape.values()),
      "model": {"family": config.family, "dtype": config.dtype, "param_dtype": config.param_dtype,
                "remat": config.remat},
      "batch": {"rows": data.batch_size, "accumulation_steps": accumulation, "rows_per_device": rows, **lengths,
                "images": data.max_images},
      "optimizer": optimizer_name,
      "frozen": list(frozen),
      "activations": activations,
  }


def main(argv=None) -> int:
  args, bindings = parse_args(sys.argv[1:] if argv is None else argv)
  import gin  # pylint: disable=import-outside-toplevel
  from t5x_lite.training import gin_files  # pylint: disable=import-outside-toplevel
  # Registers the configurables a run file binds: the model configs, and run, train and DataConfig.
  for module in ("t5x_lite.config", "t5x_lite.training.run"):
    importlib.import_module(module)
  gin.clear_config()
  try:
    device_memory = None if args.device_memory is None else parse_bytes(args.device_memory)
    if args.mesh is not None:
      from t5x_lite.sharding import parse_mesh_spec  # pylint: disable=import-outside-toplevel
      parse_mesh_spec(args.mesh)
    try:
      gin_files.parse(args.gin_files, bindings)
    except SyntaxError as e:
      raise ValueError(f"gin configuration: {e} (values are Python literals: quote strings, e.g. "
                       "--gin.train.optimizer='\"adamw\"')") from None
    except (OSError, ValueError, KeyError) as e:
      raise ValueError(f"gin configuration: {e}") from None
    report = inspect_run(args.mesh, device_memory)
  except (ValueError, OSError) as e:
    message = "\n".join(line for line in str(e).splitlines() if not line.startswith("  In call to configurable"))
    print(f"error: {message}", file=sys.stderr)
    return 2
  finally:
    gin.clear_config()
  print(json.dumps(report, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
