"""t5x_lite.malloc_tunables: the re-exec that keeps XLA:CPU's freed buffers mapped (train.py's and infer.py's
startup)."""

import json
import os
import subprocess
import sys

import pytest

from t5x_lite import malloc_tunables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Prints what the process sees and re-executes where wanted. The final process then mallocs, writes and frees a
# 64 MiB block, mallocs and writes one again, and reports the page faults of that second round (a block handed
# back to the kernel is faulted in again) and how much of it the kernel mapped with huge pages. numpy is not
# used for the block: it advises huge pages for its own arrays.
CHILD = r"""
import ctypes, json, os, resource, sys
print(json.dumps({"pid": os.getpid(), "argv": sys.argv[1:], "utf8": sys.flags.utf8_mode,
                  "tunables": os.environ.get("GLIBC_TUNABLES")}), flush=True)
from t5x_lite.malloc_tunables import reexec_with_malloc_tunables
reexec_with_malloc_tunables()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
n = 64 << 20
def written_block():
  block = libc.malloc(n)
  ctypes.memset(block, 1, n)
  return block
def anon_huge_kb():
  with open("/proc/self/smaps_rollup") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("AnonHugePages"))
libc.free(written_block())
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
written_block()
print(json.dumps({"refaults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before,
                  "huge_kb": anon_huge_kb()}), flush=True)
"""

GLIBC_DEFAULTS = ("glibc.malloc.arena_max=8:glibc.malloc.mmap_max=65536:glibc.malloc.trim_threshold=131072:"
                  "glibc.malloc.hugetlb=0")


def _run(tunables):
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  if tunables is not None:
    env["GLIBC_TUNABLES"] = tunables
  out = subprocess.run([sys.executable, "-X", "utf8", "-c", CHILD, "one", "two words"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60, check=True).stdout
  return [json.loads(line) for line in out.splitlines()]


def _thp_madvise():
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="ascii") as f:
      return "[madvise]" in f.read()
  except OSError:
    return False


needs_glibc = pytest.mark.skipif(not malloc_tunables.supported(), reason="needs glibc >= 2.35")


@needs_glibc
def test_reexec_keeps_pid_arguments_and_options_and_stops_refaults():
  first, second, result = _run(tunables="glibc.malloc.tcache_count=7")
  assert first["tunables"] == "glibc.malloc.tcache_count=7"
  added = [f"{name}={value}" for name, value in malloc_tunables.TUNABLES]
  assert second == {**first, "tunables": ":".join(["glibc.malloc.tcache_count=7", *added])}  # same pid, argv, -X
  assert second["argv"] == ["one", "two words"] and second["utf8"] == 1
  assert result["refaults"] < 100  # the freed block stayed mapped (16384 pages of 4 KiB otherwise)
  if _thp_madvise():
    assert result["huge_kb"] >= 32 << 10  # most of it in 2 MiB pages


@needs_glibc
def test_the_users_values_win_and_glibc_defaults_refault():
  first, result = _run(tunables=GLIBC_DEFAULTS)  # every name already set: no re-exec, one report line
  assert first["tunables"] == GLIBC_DEFAULTS
  assert result["refaults"] > 8000  # the 64 MiB block was unmapped on free and faulted in again
  assert result["huge_kb"] == 0 or not _thp_madvise()
  first, second, _ = _run(tunables="glibc.malloc.hugetlb=0")  # only the missing names are added
  assert second["tunables"].split(":")[0] == "glibc.malloc.hugetlb=0"
  assert "glibc.malloc.hugetlb=1" not in second["tunables"] and "glibc.malloc.arena_max=1" in second["tunables"]
