"""Command line: `python -m t5x_lite.convert --from-hf HF_DIR --out CKPT_DIR [--dtype bfloat16]`
or `python -m t5x_lite.convert --to-hf CKPT_DIR --out HF_DIR [--dtype ...]`."""

import argparse
import os
import sys
import time

from t5x_lite.errors import ConversionError


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m t5x_lite.convert", description=__doc__.split("\n")[0])
  src = parser.add_mutually_exclusive_group(required=True)
  src.add_argument("--from-hf", metavar="HF_DIR", help="transformers model directory to convert to ours")
  src.add_argument("--to-hf", metavar="CKPT_DIR", help="t5x_lite checkpoint (or HF dir) to export for transformers")
  parser.add_argument("--out", required=True, help="output directory (must not hold a checkpoint already)")
  parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                      help="parameter dtype to store (default: as the source)")
  parser.add_argument("--max-shard-size-mb", type=int, default=2048, help="--to-hf: shard size for the index")
  args = parser.parse_args(argv)

  # Imports after argument parsing, so --help is instant.
  import t5x_lite  # pylint: disable=import-outside-toplevel
  from t5x_lite.convert import checkpoint  # pylint: disable=import-outside-toplevel
  t0 = time.time()
  try:
    if args.from_hf:
      if os.path.exists(os.path.join(args.out, "params")):
        raise ConversionError(f"{args.out}: already holds a checkpoint; choose an empty --out directory")
      dtype = args.dtype or _hf_dtype(args.from_hf)
      model = t5x_lite.load(args.from_hf, dtype=dtype)
      model.save(args.out)
    else:
      if not checkpoint.is_checkpoint_dir(args.to_hf) and not os.path.exists(os.path.join(args.to_hf, "config.json")):
        raise ConversionError(f"{args.to_hf}: not a t5x_lite checkpoint (no config.json with params/)")
      model = t5x_lite.load(args.to_hf, dtype=args.dtype or "float32")
      model.save_hf(args.out, dtype=args.dtype, max_shard_bytes=args.max_shard_size_mb * 1024 ** 2)
  except (ConversionError, FileExistsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.out} ({model!r}) in {time.time() - t0:.1f}s", file=sys.stderr)
  return 0


def _hf_dtype(model_dir: str) -> str:
  """The dtype the HF config declares (dtype / torch_dtype), float32 if none or unsupported."""
  import json  # pylint: disable=import-outside-toplevel
  try:
    with open(os.path.join(model_dir, "config.json")) as f:
      cfg = json.load(f)
  except (OSError, ValueError):
    return "float32"  # load() reports the problem with the file named
  dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
  return dtype if dtype in ("float32", "bfloat16", "float16") else "float32"


if __name__ == "__main__":
  sys.exit(main())
