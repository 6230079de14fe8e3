"""XLA:CPU's collective watchdog (t5x_lite/xla_flags.py): our entry points and the test processes raise its abort
timeout, the installed jaxlib knows the flags, and a device that is late at a collective costs a warning, not the
process."""

import os
import re
import subprocess
import sys

import jax

from t5x_lite import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TERMINATE = "--xla_cpu_collective_call_terminate_timeout_seconds"


def _terminate_seconds(flags: str) -> int | None:
  found = re.findall(rf"{TERMINATE}=(\d+)", flags)
  return int(found[-1]) if found else None


def test_entry_points_raise_the_collective_abort_timeout(monkeypatch):
  """train.py, infer.py and bench/ call set_cpu_defaults(); XLA's own value (40 s after a 20 s warning) aborted an
  Adafactor run on data:2,fsdp:2,tensor:2 on a loaded 2-core machine (issue 14)."""
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  xla_flags.set_cpu_defaults()
  assert (_terminate_seconds(os.environ["XLA_FLAGS"]) or 0) >= 600


def test_test_processes_run_with_the_raised_timeout():
  """conftest.py applies the same timeout before JAX starts, so a loaded CI machine cannot hit the abort."""
  assert (_terminate_seconds(os.environ["XLA_FLAGS"]) or 0) >= 600
  assert jax.device_count() == 8


LATE_DEVICE = """
import sys, time
from t5x_lite import xla_flags
xla_flags.set_cpu_defaults()  # what train.py does before JAX starts
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

def late(i, x):
  if int(i) == 0:
    time.sleep(float(sys.argv[1]))
  return x

def f(x):
  x = jax.pure_callback(late, jax.ShapeDtypeStruct(x.shape, x.dtype), jax.lax.axis_index("d"), x)
  return jax.lax.psum(x, "d")

mesh = jax.make_mesh((8,), ("d",))
g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("d"), out_specs=P()))
print(float(g(jax.device_put(jnp.arange(8.0), NamedSharding(mesh, P("d"))))[0]))
"""


def test_a_late_device_gets_a_warning_and_the_run_goes_on():
  """One of 8 host devices reaches an all-reduce 3 s after the others, with XLA's warning at 1 s instead of 20 s:
  XLA logs that the threads "may be stuck" and, once the device arrives, that the warning was a false positive; the
  process finishes. The child applies CPU_DEFAULTS like train.py, so it also checks that this jaxlib knows every
  flag there (XLA aborts on an unknown one)."""
  env = {**os.environ, "PYTHONPATH": REPO,
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_cpu_collective_call_warn_stuck_timeout_seconds=1"}
  r = subprocess.run([sys.executable, "-c", LATE_DEVICE, "3"], env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.split()[-1] == "28.0"
  assert "may be stuck" in r.stderr and "Perhaps the timeout is too short" in r.stderr
