"""Command line: `python -m t5x_lite.convert --from-hf HF_DIR --out CKPT_DIR [--dtype bfloat16]`
or `python -m t5x_lite.convert --to-hf CKPT_DIR --out HF_DIR [--dtype ...]`."""

import argparse
import contextlib
import os
import signal
import sys
import time

from t5x_lite.errors import ConversionError


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m t5x_lite.convert", description=__doc__.split("\n")[0])
  src = parser.add_mutually_exclusive_group(required=True)
  src.add_argument("--from-hf", metavar="HF_DIR", help="transformers model directory to convert to ours")
  src.add_argument("--to-hf", metavar="CKPT_DIR",
                   help="t5x_lite checkpoint, train.py workdir (its latest checkpoint) or HF dir, for transformers")
  parser.add_argument("--out", required=True, help="output directory (must not hold a checkpoint already)")
  parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                      help="parameter dtype to store (default: as the source)")
  parser.add_argument("--max-shard-size-mb", type=int, default=2048, help="--to-hf: shard size for the index")
  args = parser.parse_args(argv)
  if args.max_shard_size_mb <= 0:
    parser.error(f"--max-shard-size-mb must be positive, got {args.max_shard_size_mb}")

  try:
    with _signals_raise():
      return _convert(args)
  except Interrupted as e:
    # The writers' `finally` has removed their temporary folder by now; nothing was moved into --out.
    print(f"error: interrupted by {e.name}; {args.out} was not written (its temporary files are removed)",
          file=sys.stderr)
    return 128 + e.signum


class Interrupted(BaseException):
  """SIGTERM or SIGINT arrived. A BaseException, like KeyboardInterrupt, so that no `except Exception` on the
  way stops it before the `finally` blocks that remove temporary output."""

  def __init__(self, signum: int):
    super().__init__(signum)
    self.signum = signum
    self.name = signal.Signals(signum).name


@contextlib.contextmanager
def _signals_raise():
  """SIGTERM and SIGINT raise Interrupted in the main thread; a second one is ignored, so that the cleanup the
  first started is not cut short. The previous handlers come back on exit."""
  signums = (signal.SIGTERM, signal.SIGINT)

  def handler(signum, frame):  # pylint: disable=unused-argument
    for s in signums:
      signal.signal(s, signal.SIG_IGN)
    raise Interrupted(signum)

  previous = {s: signal.signal(s, handler) for s in signums}
  try:
    yield
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


def _convert(args) -> int:
  # Imports after argument parsing, so --help is instant.
  import t5x_lite  # pylint: disable=import-outside-toplevel
  from t5x_lite.convert import checkpoint  # pylint: disable=import-outside-toplevel
  from t5x_lite.convert.safetensors_io import INDEX_FILE, SINGLE_FILE  # pylint: disable=import-outside-toplevel
  t0 = time.time()
  try:
    # Either format in --out would be overwritten in part (config.json) or mixed with the new files.
    held = [f for f in ("params", "config.json", SINGLE_FILE, INDEX_FILE) if os.path.exists(os.path.join(args.out, f))]
    if held:
      raise ConversionError(f"{args.out}: already holds a checkpoint ({held[0]}); choose an empty --out directory")
    if args.from_hf:
      model = t5x_lite.load(args.from_hf, dtype=args.dtype or _source_dtype(args.from_hf))
      model.save(args.out)
    else:
      if not (checkpoint.is_checkpoint_dir(args.to_hf) or os.path.exists(os.path.join(args.to_hf, "config.json"))
              or _is_workdir(args.to_hf)):
        raise ConversionError(f"{args.to_hf}: not a t5x_lite checkpoint (no config.json with params/) or a "
                              "train.py workdir (no checkpoints/)")
      # Loaded in the dtype to write, as the export writes the params' own dtype (float32 would double a bf16 model).
      model = t5x_lite.load(args.to_hf, dtype=args.dtype or _source_dtype(args.to_hf))
      model.save_hf(args.out, max_shard_bytes=args.max_shard_size_mb * 1024 ** 2)
  except (ValueError, OSError) as e:  # ConversionError is a ValueError; OSError: e.g. a full disk
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.out} ({model!r}) in {time.time() - t0:.1f}s", file=sys.stderr)
  return 0


def _source_dtype(model_dir: str) -> str:
  """The dtype `model_dir` stores its params in: our checkpoint's param_dtype, or what the HF config declares
  (dtype / torch_dtype), float32 if none or unsupported."""
  import json  # pylint: disable=import-outside-toplevel
  from t5x_lite.convert import checkpoint  # pylint: disable=import-outside-toplevel
  if checkpoint.is_checkpoint_dir(model_dir):
    return checkpoint.read_config(model_dir).param_dtype
  if _is_workdir(model_dir):  # the model of its run, as train.py writes it beside the checkpoints
    path = os.path.join(model_dir, "model_config.json")
    with open(path) as f:
      return checkpoint.config_from_json(f.read(), path).param_dtype
  try:
    with open(os.path.join(model_dir, "config.json")) as f:
      cfg = json.load(f)
  except (OSError, ValueError):
    return "float32"  # load() reports the problem with the file named
  dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
  return dtype if dtype in ("float32", "bfloat16", "float16") else "float32"


def _is_workdir(path: str) -> bool:
  """A train.py workdir: checkpoints/ and the run's model_config.json (what t5x_lite.load reads as one)."""
  return os.path.isdir(os.path.join(path, "checkpoints")) and os.path.isfile(os.path.join(path, "model_config.json"))


if __name__ == "__main__":
  sys.exit(main())
