"""Pretrain or fine-tune with gin configs on a device mesh, resuming from the latest checkpoint in --workdir.

  python train.py --gin_file=configs/runs/demo.gin [--gin_file=...] [--gin.TRAIN_STEPS=40 ...] --workdir DIR
  multi-host: add --coordinator_address=HOST:PORT --num_processes=N --process_id=I [--coordinator_timeout=300]

`--gin.NAME=VALUE` is a gin binding (`NAME = VALUE`): a macro such as TRAIN_STEPS or a parameter such as
train.log_every. Gin files are read from the working directory, else from the project's configs (so
`configs/runs/demo.gin` works from anywhere). SIGTERM or Ctrl-C saves a checkpoint and exits 0 (on several hosts, a
signal to any one of them makes all save the same step); rerunning the same command continues the run, also on
another number of devices or processes (the global batch must stay the same unless
--gin.train.allow_batch_size_change=True). A workdir is used by one run at a time. The mesh:
--gin.train.mesh_spec="'fsdp:4,tensor:2'" (default: every device on data).
"""

import argparse
import os
import sys
import textwrap


def parse_args(argv):
  from t5x_lite import multihost  # pylint: disable=import-outside-toplevel  (no JAX)
  from t5x_lite.training.gin_files import split_gin_flags  # pylint: disable=import-outside-toplevel  (no JAX)
  bindings, rest = split_gin_flags(argv)
  from t5x_lite.mesh_spec import MESH_SPEC_HELP  # pylint: disable=import-outside-toplevel  (no JAX)
  notes = [__doc__.split("\n\n", 1)[1].strip(), textwrap.fill(MESH_SPEC_HELP, 115, break_on_hyphens=False)]
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="\n\n".join(notes),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
  p.add_argument("--workdir", required=True)
  multihost.add_flags(p)
  args = p.parse_args(rest)
  if not args.gin_file:
    p.error("give at least one --gin_file (e.g. configs/runs/demo.gin)")
  multihost.check_flags(p, args)
  return args, bindings


def main(argv=None) -> int:
  args, bindings = parse_args(sys.argv[1:] if argv is None else argv)
  from t5x_lite.xla_flags import set_cpu_defaults  # pylint: disable=import-outside-toplevel
  set_cpu_defaults()
  from t5x_lite import multihost  # pylint: disable=import-outside-toplevel
  multihost.initialize(args, "train.py")  # a coordinator that does not answer in time: exit 2 naming its address
  import t5x_lite.config  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import  (registers configurables)
  from t5x_lite.data import pipeline  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  from t5x_lite.training import gin_files  # pylint: disable=import-outside-toplevel
  from t5x_lite.training import run as run_lib  # pylint: disable=import-outside-toplevel
  from t5x_lite.training.loop import NonFiniteLoss  # pylint: disable=import-outside-toplevel
  from t5x_lite.training.workdir import WorkdirInUse  # pylint: disable=import-outside-toplevel
  try:
    gin_files.parse(args.gin_file, bindings)  # mistakes name their file and line, or their flag
  except (OSError, ValueError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    os.makedirs(args.workdir, exist_ok=True)
    if not os.access(args.workdir, os.W_OK):
      raise PermissionError("not writable")
  except OSError as e:
    print(f"error: --workdir {args.workdir}: cannot create or write it ({e.strerror or e})", file=sys.stderr)
    return 2
  try:
    run_lib.run(args.workdir)
  except NonFiniteLoss as e:
    print(f"error: {_without_gin_context(e)}", file=sys.stderr)
    return 3
  except (ValueError, OSError, WorkdirInUse) as e:  # OSError: a data file that is missing, a directory, unreadable
    print(f"error: {_without_gin_context(e)}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:  # before training began, or a second Ctrl-C (the first one saves and exits cleanly)
    print("\ninterrupted: stopped without saving", file=sys.stderr)
    return 130
  return 0


def _without_gin_context(e: Exception) -> str:
  """The message without the "  In call to configurable 'train' (<function ...>)" lines gin appends."""
  return "\n".join(line for line in str(e).splitlines() if not line.startswith("  In call to configurable"))


if __name__ == "__main__":
  from t5x_lite.malloc_tunables import reexec_with_malloc_tunables
  reexec_with_malloc_tunables()  # before anything else: it may replace this process (see the module)
  sys.exit(main())
