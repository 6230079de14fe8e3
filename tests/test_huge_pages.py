"""t5x_lite.huge_pages: the re-exec that turns on transparent huge pages for malloc'd blocks (train.py's startup)."""

import json
import os
import subprocess
import sys

import pytest

from t5x_lite import huge_pages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Prints what the process sees, re-executes where wanted, and (in the final process) reports how much of a freshly
# malloc'd and written 64 MiB block the kernel mapped with huge pages. numpy is not used for the block: it advises
# huge pages for its own arrays.
CHILD = r"""
import ctypes, json, os, sys
print(json.dumps({"pid": os.getpid(), "argv": sys.argv[1:], "utf8": sys.flags.utf8_mode,
                  "tunables": os.environ.get("GLIBC_TUNABLES")}), flush=True)
from t5x_lite.huge_pages import reexec_with_huge_pages
reexec_with_huge_pages()
def anon_huge_kb():
  for line in open("/proc/self/smaps_rollup"):
    if line.startswith("AnonHugePages"):
      return int(line.split()[1])
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
before, n = anon_huge_kb(), 64 << 20
block = libc.malloc(n)
ctypes.memset(block, 1, n)
print(json.dumps({"huge_kb": anon_huge_kb() - before}), flush=True)
"""


def _run(tunables):
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  if tunables is not None:
    env["GLIBC_TUNABLES"] = tunables
  out = subprocess.run([sys.executable, "-X", "utf8", "-c", CHILD, "one", "two words"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60, check=True).stdout
  return [json.loads(line) for line in out.splitlines()]


needs_madvise_thp = pytest.mark.skipif(not huge_pages.supported(),
                                       reason="needs glibc >= 2.35 and the kernel's THP mode 'madvise'")


@needs_madvise_thp
def test_reexec_keeps_pid_arguments_and_options_and_maps_huge_pages():
  first, second, result = _run(tunables="glibc.malloc.arena_max=2")
  assert first["tunables"] == "glibc.malloc.arena_max=2"
  assert second == {**first, "tunables": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}  # same pid, argv, -X
  assert second["argv"] == ["one", "two words"] and second["utf8"] == 1
  assert result["huge_kb"] >= 32 << 10  # most of the 64 MiB block sits in 2 MiB pages


@needs_madvise_thp
def test_the_users_setting_wins_and_without_it_blocks_use_small_pages():
  first, result = _run(tunables="glibc.malloc.hugetlb=0")  # no re-exec: one report line, then the block
  assert first["tunables"] == "glibc.malloc.hugetlb=0"
  assert result["huge_kb"] == 0
