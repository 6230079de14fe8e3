"""What the training loop's per-step preemption vote costs (t5x_lite/training/loop.py `_StopVote`).

    .venv/bin/python bench/bench_stop_vote.py [--processes 2] [--devices 2] [--votes 300]

Starts `--processes` CPU processes on this machine (gloo collectives, `--devices` host devices each), as train.py's
multi-host runs do, and times `--votes` votes back to back in each, after 20 to warm up: one dispatch of a tiny
all-reduce over every device plus the read of the previous vote. Prints the machine and the milliseconds per vote.
"""

import argparse
import os
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(args) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.processes,
                             process_id=args.process_id)
  from t5x_lite.training.loop import _StopVote  # pylint: disable=import-outside-toplevel,protected-access
  vote = _StopVote()
  for _ in range(20):
    vote(False)
  start = time.perf_counter()
  for _ in range(args.votes):
    vote(False)
  vote(False)  # reads the last timed vote
  per_vote = (time.perf_counter() - start) / args.votes
  print(f"process {args.process_id}: {per_vote * 1e3:.2f} ms a vote ({args.votes} votes, "
        f"{jax.device_count()} devices in {jax.process_count()} processes)", flush=True)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--processes", type=int, default=2)
  p.add_argument("--devices", type=int, default=2)
  p.add_argument("--votes", type=int, default=300)
  p.add_argument("--process_id", type=int, default=None, help=argparse.SUPPRESS)  # a worker
  p.add_argument("--coordinator", default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.process_id is not None:
    worker(args)
    return
  with open("/proc/cpuinfo") as f:
    cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown CPU")
  print(f"machine: {cpu}, {os.cpu_count()} logical cores, load average {os.getloadavg()[0]:.2f} at start")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={args.devices}"}
  procs = [subprocess.Popen([sys.executable, __file__, f"--processes={args.processes}", f"--votes={args.votes}",
                             f"--process_id={i}", f"--coordinator=127.0.0.1:{port}"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
           for i in range(args.processes)]
  for proc in procs:
    out, _ = proc.communicate()
    print(out.strip() if proc.returncode == 0 else f"a worker failed (exit {proc.returncode})")


if __name__ == "__main__":
  main()
