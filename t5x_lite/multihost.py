"""Joining a multi-host job: the flags train.py and infer.py share, and `jax.distributed.initialize` with a bounded,
named wait.

Every host runs the same command with its own `--process_id`; process 0 runs the coordination service at
`--coordinator_address`, the others connect to it. JAX's own failure when a peer never comes is a C++ fatal error
(SIGABRT, a stack trace and "DEADLINE_EXCEEDED ... RegisterTask") after its `initialization_timeout`; before it, a
process waits without a word. A watchdog thread here ends the wait at `--coordinator_timeout` seconds instead, with
one line naming the address, and exit status 2 (a user's mistake: a wrong address, a missing process). JAX releases
the GIL while it connects, so the thread runs; JAX's own timeout is set past ours, so the watchdog always speaks first.
"""

import argparse
import os
import sys
import textwrap
import threading

DEFAULT_TIMEOUT_S = 300  # jax.distributed's own default: hosts of a large job start minutes apart
EXIT_USAGE = 2

FLAGS_HELP = (
    "The same command on every host with --coordinator_address=HOST:PORT (process 0's host; it runs the "
    "coordinator there) --num_processes=N --process_id=I (0..N-1); on Cloud TPU none are needed. A host that has "
    "not met the coordinator and all N processes within --coordinator_timeout seconds exits 2 naming the address.")


def add_flags(parser: argparse.ArgumentParser, *, underscores: bool = True) -> None:
  """--coordinator_address, --num_processes, --process_id and --coordinator_timeout (also spelt with dashes when
  `underscores` is False, as infer.py's other flags are)."""
  group = parser.add_argument_group("multi-host", textwrap.fill(FLAGS_HELP, 100))
  for name, kwargs in (("coordinator_address", dict(default=None, metavar="HOST:PORT")),
                       ("num_processes", dict(type=int, default=None, metavar="N")),
                       ("process_id", dict(type=int, default=None, metavar="I")),
                       ("coordinator_timeout", dict(type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                                                    help=f"default {DEFAULT_TIMEOUT_S}"))):
    spellings = [f"--{name}"] if underscores else [f"--{name.replace('_', '-')}", f"--{name}"]
    group.add_argument(*spellings, dest=name, **kwargs)


def check_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """parser.error (exit 2) on an incomplete or inconsistent set of multi-host flags."""
  given = (args.coordinator_address, args.num_processes, args.process_id)
  if any(a is not None for a in given) and None in given:
    parser.error("multi-host runs need all of --coordinator_address, --num_processes and --process_id")
  if args.num_processes is not None:
    if args.num_processes < 1:
      parser.error(f"--num_processes must be >= 1, got {args.num_processes}")
    if not 0 <= args.process_id < args.num_processes:
      parser.error(f"--process_id must be in [0, {args.num_processes}), got {args.process_id}")
  if not args.coordinator_timeout > 0:
    parser.error(f"--coordinator_timeout must be > 0 seconds, got {args.coordinator_timeout}")


def initialize(args: argparse.Namespace, prog: str) -> None:
  """jax.distributed.initialize from the flags, if they were given; a wait longer than --coordinator_timeout ends
  the process with exit 2 and one line naming the coordinator's address."""
  if args.coordinator_address is None:
    return
  import jax  # pylint: disable=import-outside-toplevel
  # CPU processes reach each other through gloo; the setting only concerns CPU devices, so it is harmless on GPU/TPU
  # hosts (and asking for the backend here would initialise it too early).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  timeout = args.coordinator_timeout
  if args.process_id == 0:
    what = (f"not all {args.num_processes} processes reached the coordinator this process runs at "
            f"{args.coordinator_address}")
  else:
    what = (f"process {args.process_id} of {args.num_processes} could not join the coordinator at "
            f"{args.coordinator_address} (is process 0 running there, and are all {args.num_processes} started?)")

  def give_up():
    print(f"{prog}: error: {what} within --coordinator_timeout={timeout:g} s", file=sys.stderr, flush=True)
    os._exit(EXIT_USAGE)  # pylint: disable=protected-access  (the main thread is inside JAX's C++ connect)

  watchdog = threading.Timer(timeout, give_up)
  watchdog.daemon = True
  watchdog.start()
  try:
    jax.distributed.initialize(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                               process_id=args.process_id, initialization_timeout=int(timeout) + 60)
  finally:
    watchdog.cancel()


def agree_on_first(value: int) -> int:
  """Process 0's `value`, on every process; a collective, so no process returns before all have called it."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return int(multihost_utils.broadcast_one_to_all(np.int32(value)))
