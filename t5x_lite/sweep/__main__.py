"""Gin sweeps of train.py runs that resume and scale out.

  python -m t5x_lite.sweep run --sweep_dir=DIR --gin_file=CONFIG.gin [--gin.NAME=VALUE ...] \\
      --sweep.grid='NAME=[v1, v2]' [--sweep.grid=...] [--sweep.variants=FILE.jsonl] [--sweep.metric=loss] \\
      [--sweep.mode=min|max] [--sweep.processes=N] [--sweep.executor=local|slurm ...]
  python -m t5x_lite.sweep status --sweep_dir=DIR
  python -m t5x_lite.sweep report --sweep_dir=DIR

Grids multiply; a variants file lists points (one JSON object of bindings per line) and is one more factor. A
trial's name hashes its bindings and the base configuration, so rerunning the command runs no finished trial,
resumes interrupted ones, retries failed ones, and runs only the new points of a grid that gained a value; start
the same command several times (on hosts sharing DIR) to run several trials at once. Every point is checked
before any runs: a mistake exits 2 naming its flag or FILE:LINE. `status` prints the table; `report` writes
DIR/results.csv, results.md, loss.png and tensorboard/ (`tensorboard --logdir DIR/tensorboard`: HParams) too.
"""

import argparse
import json
import os
import sys


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m t5x_lite.sweep", description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("command", choices=["run", "status", "report"])
  p.add_argument("--sweep_dir", required=True)
  p.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
  p.add_argument("--sweep.grid", dest="grid", action="append", default=[], help="NAME=[v1, v2] (repeatable)")
  p.add_argument("--sweep.variants", dest="variants", default=None, help="JSONL: one object of bindings per line")
  p.add_argument("--sweep.metric", dest="metric", default=None,
                 help="a key of metrics.jsonl, or eval/KEY of eval_metrics.jsonl (default loss)")
  p.add_argument("--sweep.mode", dest="mode", choices=["min", "max"], default=None, help="best is min (default)")
  p.add_argument("--sweep.executor", dest="executor", choices=["local", "slurm"], default="local")
  p.add_argument("--sweep.processes", dest="processes", type=int, default=1,
                 help="processes per trial (local) or tasks per node (slurm): one jax.distributed job")
  p.add_argument("--sweep.gpus_per_process", dest="gpus_per_process", type=int, default=None,
                 help="local: give process i of a trial GPUs i*k .. i*k+k-1 (CUDA_VISIBLE_DEVICES)")
  p.add_argument("--sweep.nodes", dest="nodes", type=int, default=1, help="slurm: nodes per trial")
  p.add_argument("--sweep.gpus_per_node", dest="gpus_per_node", type=int, default=None)
  p.add_argument("--sweep.cpus_per_task", dest="cpus_per_task", type=int, default=None)
  p.add_argument("--sweep.timeout_min", dest="timeout_min", type=int, default=60, help="slurm: time limit")
  p.add_argument("--sweep.partition", dest="partition", default=None, help="slurm partition")
  p.add_argument("--sweep.slurm_parameters", dest="slurm_parameters", default=None,
                 help="JSON object of further submitit parameters, e.g. '{\"slurm_account\": \"me\"}'")
  p.add_argument("--sweep.slurm_cluster", dest="slurm_cluster", default=None,
                 help="submitit's cluster: slurm (default where sbatch exists), local or debug (tests)")
  p.add_argument("--sweep.train_py", dest="train_py", default=None, help="train.py (default: the repository's)")
  return p


def parse_args(argv):
  from t5x_lite.training.gin_files import split_gin_flags  # pylint: disable=import-outside-toplevel  (no JAX)
  bindings, rest = split_gin_flags(argv)
  p = _parser()
  args = p.parse_args(rest)
  if args.command == "run":
    if not args.gin_file:
      p.error("run: give at least one --gin_file (e.g. configs/runs/demo.gin)")
  elif args.gin_file or bindings or args.grid or args.variants:
    p.error(f"{args.command} reads the sweep from --sweep_dir; --gin_file, --gin.* and grids are for run")
  return args, bindings


def _executor(args):
  from t5x_lite.sweep import executors  # pylint: disable=import-outside-toplevel
  if args.executor == "local":
    return executors.LocalExecutor(args.processes, args.gpus_per_process)
  extra = json.loads(args.slurm_parameters) if args.slurm_parameters else None
  if extra is not None and not isinstance(extra, dict):
    raise ValueError(f"--sweep.slurm_parameters: give a JSON object, got {args.slurm_parameters}")
  return executors.SlurmExecutor(os.path.join(args.sweep_dir, "slurm"), nodes=args.nodes,
                                 tasks_per_node=args.processes, gpus_per_node=args.gpus_per_node,
                                 cpus_per_task=args.cpus_per_task, timeout_min=args.timeout_min,
                                 partition=args.partition, parameters=extra, cluster=args.slurm_cluster)


def _run(args, bindings) -> int:
  from t5x_lite.sweep import driver, plan, space  # pylint: disable=import-outside-toplevel
  try:
    points = space.expand(args.grid, args.variants)
    trials = plan.plan(args.sweep_dir, args.gin_file, bindings, points, args.train_py)
    executor = _executor(args)
  except (OSError, ValueError) as e:  # refused before anything was written or run
    print(f"error: {e}", file=sys.stderr)
    return 2
  return driver.run(args.sweep_dir, trials, executor, args.metric or "loss", args.mode or "min")


def _table(args, write: bool) -> int:
  from t5x_lite.sweep import results  # pylint: disable=import-outside-toplevel
  from t5x_lite.sweep.queue import Queue  # pylint: disable=import-outside-toplevel
  if not os.path.isfile(os.path.join(args.sweep_dir, "study.journal")):
    print(f"error: --sweep_dir {args.sweep_dir}: no sweep there (no study.journal)", file=sys.stderr)
    return 2
  queue = Queue(args.sweep_dir)
  info = queue.info()
  metric, mode = args.metric or info.get("metric", "loss"), args.mode or info.get("mode", "min")
  table = results.rows(queue.trials(), args.sweep_dir, metric, mode)
  if write:
    for name, path in results.write_all(args.sweep_dir, table, metric).items():
      print(f"{name}: {path}")
  counts = {}
  for r in table:
    counts[r["status"]] = counts.get(r["status"], 0) + 1
  print(f"{len(table)} trials: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
  print(results.to_markdown(table, metric), end="")
  return 0


def main(argv=None) -> int:
  args, bindings = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    if args.command == "run":
      return _run(args, bindings)
    return _table(args, write=args.command == "report")
  except KeyboardInterrupt:  # before trials ran (the driver's own handler covers a running one)
    print("\ninterrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
