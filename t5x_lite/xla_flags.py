"""XLA:CPU flags our entry points default to (train.py, infer.py, bench/): added to `XLA_FLAGS` unless the user
already set the same flag, before JAX initialises its backends (XLA reads the variable once, at that point).
tests/conftest.py adds COLLECTIVE_TIMEOUTS to the test processes the same way.

`--xla_cpu_experimental_ynn_fusion_type=dot`: hand XLA:CPU's YNNPACK only the matmuls, not the reductions and
elementwise fusions as well. Its reductions ran the attention-bias gradient (a sum of (8, 6, 512, 512) over the
batch) at under 1 GB/s: the t5-v1_1-small training step (batch 8 x 512/114, f32, 2-core EPYC) took 9.3 s with
the default and 8.2 s with this flag; decoding speed did not change beyond noise.

`--xla_cpu_collective_call_terminate_timeout_seconds=600`: with several host devices in one process
(`--xla_force_host_platform_device_count`) each device runs its part of a sharded program on its own thread and
blocks at every collective until all devices reach it. XLA logs "This thread has been waiting for `all reduce ...`
for 20 seconds and may be stuck" (`--xla_cpu_collective_call_warn_stuck_timeout_seconds`, left at 20) and aborts
the process (SIGABRT, no checkpoint) this many seconds after that warning: "Termination timeout for `all reduce
...` of 40 seconds exceeded" with XLA's value. Its clock is wall time, so a device that is only late trips it too:
one device held back 65 s on purpose aborts with XLA's 40 and finishes with 600. Issue 14's aborts (Adafactor on
data:2,fsdp:2,tensor:2, a loaded 2-core machine) were not reproduced here, and nothing in the program could hang
a collective: the train step compiles to one SPMD program without conditionals or host callbacks, whose collectives
(demo T5: Adafactor 62 all-reduces, 46 all-gathers, 2 collective-permutes; AdamW 23 / 46 / 2) XLA issues in one
order on every device. Measured waits at a collective (warning set to 1 s): none over 1 s for the demo T5 on that
mesh beside 4 or 8 busy loops or as 3 runs at once (step 0.2 s alone, 0.3-4 s loaded), at most 2.3 s for a
d_model 512, 8+8-layer T5 beside 8 busy loops (step 3.4 s alone, 8-11 s loaded). 600 s leaves the detector for a
true hang (it aborts with XLA's message 620 s in) without killing a run that is merely starved.
"""

import os

COLLECTIVE_TIMEOUTS = ("--xla_cpu_collective_call_terminate_timeout_seconds=600",)
CPU_DEFAULTS = ("--xla_cpu_experimental_ynn_fusion_type=dot", *COLLECTIVE_TIMEOUTS)


def set_cpu_defaults(flags: tuple[str, ...] = CPU_DEFAULTS) -> None:
  """Appends each of `flags` to XLA_FLAGS unless XLA_FLAGS already names it (the user's value wins)."""
  current = os.environ.get("XLA_FLAGS", "")
  extra = [f for f in flags if f.split("=", 1)[0] not in current]
  if extra:
    os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()
