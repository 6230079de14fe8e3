"""Foundation benchmark: forward/backward compile time against depth, and the converter's peak memory.

    .venv/bin/python bench/bench_foundation.py [--reps 3] [--depths 2,8,24] [--no-unrolled] [--no-big-vocab]

Part 1 compiles `t5.forward` and `jax.grad` of a mean-logit loss for a model at t5-v1_1-small widths with 2, 8
and 24 layers per stack (lower and XLA compile timed apart, min/median of interleaved repetitions, plus the
optimized HLO size, which timing noise cannot touch). The layers run under `jax.lax.scan`, so compile time
should stay flat with depth. For contrast the same `t5.forward` is compiled with `scan_layers` swapped for a
Python loop (patched into the `t5` module of this process only; no library change), which grows with depth.

Part 2 saves a transformers T5ForConditionalGeneration (t5-v1_1-small: 8+8 layers, untied head, 77M params,
294 MB float32) single-file and as a 50 MB-sharded index, plus an mT5-small-like copy whose embedding and
lm_head are widened to vocab 250112 (1.1 GB, dominated by two 489 MB leaves). Each conversion runs in a fresh
subprocess, so torch and transformers do not pollute it: `t5x_lite.load` (f32 and -> bf16), the CLI
`python -m t5x_lite.convert --from-hf ... --dtype bfloat16` (under /usr/bin/time -v), `Model.save` (orbax) and
`Model.save_hf` (single file and 50 MB shards). The parent samples the child's /proc/PID/status every 2 ms
(RssAnon: heap, numpy and jax buffers; RssFile: file-backed pages, i.e. the memory-mapped safetensors pages
the reader has touched) and takes the kernel's exact peak (VmHWM, reset at the start of the measured phase).
The converter holds one copy of the model when the anonymous increment is the params' bytes plus about one
leaf in flight.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

MB = 1024 ** 2
# t5-v1_1-small widths (d_model 512, 6 heads x 64, gated-gelu d_ff 1024, untied head, vocab 32128).
WIDTH = dict(vocab_size=32128, d_model=512, num_heads=6, head_dim=64, d_ff=1024)
BATCH, INPUT_LEN, TARGET_LEN = 2, 64, 16
STATUS_KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")


# ------------------------------------------------------------------------------------------------ header

def machine_header() -> list[str]:
  import jax  # pylint: disable=import-outside-toplevel
  cpu = "unknown CPU"
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024 ** 3
  usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  try:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                         check=False).stdout.strip() or "?"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                           capture_output=True, text=True, check=False).stdout.strip()
    rev += " (+ uncommitted changes)" if dirty else ""
  except OSError:
    rev = "?"
  load1, load5, _ = os.getloadavg()
  return [
      f"machine : {cpu}, {os.cpu_count()} logical cores ({usable} usable), {mem_gb:.1f} GiB RAM, "
      f"load average {load1:.2f} / {load5:.2f} (1 / 5 min) at start",
      f"software: python {platform.python_version()}, jax {jax.__version__} on {jax.devices()[0].platform} "
      f"({jax.device_count()} device), numpy {_version('numpy')}, safetensors {_version('safetensors')}, "
      f"transformers {_version('transformers')}, torch {_version('torch')}",
      f"repo    : {REPO} @ {rev}",
  ]


def _version(module: str) -> str:
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  try:
    return metadata.version(module)
  except metadata.PackageNotFoundError:
    return "absent"


def table(headers: list[str], rows: list[list[str]], left: int = 1) -> str:
  """Plain-text table; the first `left` columns are left-aligned, the rest right-aligned."""
  widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
  fmt = lambda r: "  ".join(str(x).rjust(w) if i >= left else str(x).ljust(w)
                            for i, (x, w) in enumerate(zip(r, widths)))
  return "\n".join([fmt(headers), "  ".join("-" * w for w in widths), *map(fmt, rows)])


# ------------------------------------------------------------------------------------ part 1: compiling

def _unrolled_layers(layer_fn, x, stacked_params, *, num_layers, rng=None, remat="none"):
  """Drop-in for `t5x_lite.models.layers.scan_layers` that unrolls the stack in Python (no dropout/remat)."""
  import jax  # pylint: disable=import-outside-toplevel
  assert rng is None and remat == "none"
  for i in range(num_layers):
    x = layer_fn(x, jax.tree.map(lambda a, i=i: a[i], stacked_params), None)
  return x


class _Unrolled:
  """Context: `t5.forward` traces every layer separately (patches the name t5.py looks up, in this process)."""

  def __enter__(self):
    from t5x_lite.models import t5  # pylint: disable=import-outside-toplevel
    self._t5, self._saved = t5, t5.scan_layers
    t5.scan_layers = _unrolled_layers

  def __exit__(self, *exc):
    self._t5.scan_layers = self._saved


def _t5_config(layers: int):
  from t5x_lite.config import T5Config  # pylint: disable=import-outside-toplevel
  return T5Config(**WIDTH, num_encoder_layers=layers, num_decoder_layers=layers, mlp_activation="gelu_tanh",
                  mlp_gated=True, tie_lm_head=False, scale_decoder_outputs=False, dropout_rate=0.0)


def _time_compile(make_fn, args) -> tuple[float, float, float, object]:
  """(lower s, compile s, compile CPU s, compiled) for a freshly built jitted function (no trace or executable
  reuse). CPU time (all threads of this process) is far less sensitive than wall time to other processes."""
  fn = make_fn()
  t0 = time.perf_counter()
  lowered = fn.lower(*args)
  t1, c1 = time.perf_counter(), time.process_time()
  compiled = lowered.compile()
  t2, c2 = time.perf_counter(), time.process_time()
  return t1 - t0, t2 - t1, c2 - c1, compiled


def _time_runs(compiled, args, n: int) -> tuple[float, float | None]:
  """(first run s, median of the next n runs s or None), outputs blocked on."""
  import jax  # pylint: disable=import-outside-toplevel
  t0 = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  first = time.perf_counter() - t0
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  return first, (statistics.median(times) if times else None)


def _hlo_stats(compiled) -> tuple[int, int]:
  """(optimized HLO text size in kB, while loops in it): what XLA had to compile, free of timing noise."""
  text = compiled.as_text()
  return len(text) // 1000, text.count(" while(")


def _ms(seconds: float | None) -> str:
  return "-" if seconds is None else f"{seconds * 1e3:.0f}"


def bench_compile(depths: list[int], reps: int, unrolled_depths: list[int]) -> list[str]:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from t5x_lite.models import t5  # pylint: disable=import-outside-toplevel
  from t5x_lite.models.params import count_params, init_params  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(2, WIDTH["vocab_size"], (BATCH, INPUT_LEN)), jnp.int32)
  mask = jnp.ones((BATCH, INPUT_LEN), jnp.int32).at[1, INPUT_LEN // 2:].set(0)
  dec = jnp.asarray(rng.integers(2, WIDTH["vocab_size"], (BATCH, TARGET_LEN)), jnp.int32)
  dec_mask = jnp.ones((BATCH, TARGET_LEN), jnp.int32)
  batch = (ids, mask, dec, dec_mask)

  def makers(config):
    return (("forward", lambda: jax.jit(lambda p, *a: t5.forward(p, config, *a))),
            ("fwd+bwd (grad)", lambda: jax.jit(jax.grad(lambda p, *a: jnp.mean(t5.forward(p, config, *a))))))

  # Warm-up (untimed): the first XLA compile of a process pays one-off start-up costs.
  warm_config = _t5_config(1)
  warm_args = (init_params(t5.param_specs(warm_config), jax.random.PRNGKey(1)), *batch)
  for _, make in makers(warm_config):
    _time_compile(make, warm_args)
  del warm_args

  configs = {d: _t5_config(d) for d in depths}
  args = {d: (init_params(t5.param_specs(c), jax.random.PRNGKey(d)), *batch) for d, c in configs.items()}
  results = {}  # (how, kind, depth) -> dict
  # Repetitions round-robin over depths, so load from other processes on the machine hits all depths alike.
  for rep in range(reps):
    for depth in depths:
      for kind, make in makers(configs[depth]):
        lo, co, cpu, compiled = _time_compile(make, args[depth])
        r = results.setdefault(("scan", kind, depth), dict(lower=[], compile=[], cpu=[],
                                                           params=count_params(t5.param_specs(configs[depth]))))
        r["lower"].append(lo)
        r["compile"].append(co)
        r["cpu"].append(cpu)
        if rep == reps - 1:
          r["hlo"] = _hlo_stats(compiled)
          r["first"], r["steady"] = _time_runs(compiled, args[depth], 3 if kind == "forward" else 0)
          if kind == "forward":
            r["logits"] = compiled(*args[depth])
        print(f"  [scan    ] rep {rep + 1}/{reps} {kind:14s} {depth:2d} layers: lower {lo:.2f}s compile {co:.2f}s "
              f"(CPU {cpu:.2f}s)", flush=True)
  for depth in unrolled_depths:
    with _Unrolled():
      for kind, make in makers(configs[depth]):
        lo, co, cpu, compiled = _time_compile(make, args[depth])
        # Running the unrolled gradient adds nothing to the compile story and costs ~10 s at 24 layers.
        first, steady = _time_runs(compiled, args[depth], 3) if kind == "forward" else (None, None)
        r = results[("unrolled", kind, depth)] = dict(lower=[lo], compile=[co], cpu=[cpu], first=first, steady=steady,
                                                      hlo=_hlo_stats(compiled),
                                                      params=results[("scan", kind, depth)]["params"])
        if kind == "forward":
          scanned = results[("scan", kind, depth)]["logits"]
          r["max_abs_diff"] = float(jnp.max(jnp.abs(compiled(*args[depth]) - scanned)))
        print(f"  [unrolled] {kind:14s} {depth:2d} layers: lower {lo:.2f}s compile {co:.2f}s (CPU {cpu:.2f}s)",
              flush=True)
  del args

  rows = []
  for (how, kind, depth), r in sorted(results.items(), key=lambda kv: (kv[0][1] != "forward", kv[0][0], kv[0][2])):
    rows.append([kind, how, f"{depth}+{depth}", f"{r['params'] / 1e6:.1f}M",
                 f"{min(r['lower']):.2f}", f"{min(r['compile']):.2f}",
                 f"{statistics.median(r['compile']):.2f}" if len(r["compile"]) > 1 else "-", f"{min(r['cpu']):.2f}",
                 f"{r['hlo'][0]}", f"{r['hlo'][1]}",
                 _ms(r["first"]), _ms(r["steady"])])
  lines = [table(["pass", "layers via", "enc+dec", "params", "lower s", "compile s (min)", "compile s (median)",
                  "compile CPU s (min)", "HLO kB", "while loops", "1st run ms", "steady ms"], rows, left=2), ""]
  lo_d, hi_d = min(depths), max(depths)
  _total = lambda r: min(r["lower"]) + min(r["compile"])  # noqa: E731
  for kind in ("forward", "fwd+bwd (grad)"):
    for how in ("scan", "unrolled"):
      a, b = results.get((how, kind, lo_d)), results.get((how, kind, hi_d))
      if a and b:
        lines.append(f"  {kind:14s} {how:8s}: {hi_d}-layer / {lo_d}-layer compile = "
                     f"{min(b['compile']) / min(a['compile']):.2f}x (min), "
                     f"{statistics.median(b['compile']) / statistics.median(a['compile']):.2f}x (median), "
                     f"{min(b['cpu']) / min(a['cpu']):.2f}x (CPU time); "
                     f"lower+compile {_total(b) / _total(a):.2f}x; "
                     f"optimized HLO {b['hlo'][0] / a['hlo'][0]:.2f}x")
    s_, u = results.get(("scan", kind, hi_d)), results.get(("unrolled", kind, hi_d))
    if s_ and u:
      lines.append(f"  {kind:14s} at {hi_d} layers: unrolled / scan = {min(u['compile']) / min(s_['compile']):.2f}x "
                   f"compile, {_total(u) / _total(s_):.2f}x lower+compile")
  for (how, kind, depth), r in sorted(results.items()):
    if "max_abs_diff" in r:
      lines.append(f"  check: unrolled vs scanned forward logits at {depth} layers: "
                   f"max |diff| = {r['max_abs_diff']:.1e}")
  return lines


# -------------------------------------------------------------------------------- part 2: peak memory

def _status(pid="self") -> dict[str, int]:
  """Selected /proc/PID/status fields in bytes (empty once the process is gone or a zombie)."""
  out = {}
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        key, _, rest = line.partition(":")
        if key in STATUS_KEYS:
          out[key] = int(rest.split()[0]) * 1024
  except (OSError, ValueError):
    pass
  return out


def _child_mark(name: str, **extra) -> None:
  print("@@" + name + " " + json.dumps({"status": _status(), "t": time.monotonic(), **extra}), flush=True)


def _reset_hwm() -> bool:
  """Resets this process's VmHWM to its current RSS (Linux: `echo 5 > /proc/self/clear_refs`)."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _child_warm_up() -> None:
  """Imports and backend start-up that every measured phase would otherwise count."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import t5x_lite.model  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import  (the package is lazy)
  import t5x_lite.tokenizer  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  jax.block_until_ready(jnp.zeros(8) + 1)


def _params_bytes(params) -> int:
  import jax  # pylint: disable=import-outside-toplevel
  return sum(int(x.nbytes) for x in jax.tree.leaves(params))


def _largest_leaf(params) -> int:
  import jax  # pylint: disable=import-outside-toplevel
  return max(int(x.nbytes) for x in jax.tree.leaves(params))


def _malloc_trim() -> bool:
  """Runs Python's cyclic GC and returns freed heap to the OS (glibc), so what remains is live data."""
  import gc  # pylint: disable=import-outside-toplevel
  gc.collect()
  try:
    import ctypes  # pylint: disable=import-outside-toplevel
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return True
  except (OSError, AttributeError):
    return False


def child_main(argv: list[str]) -> None:
  """Entry point of the measured subprocesses (`--child MODE ...`)."""
  mode = argv[0]
  if mode == "build_hf":
    _build_hf(*argv[1:])
    return
  if mode == "widen_vocab":
    _widen_vocab(*argv[1:])
    return
  _child_warm_up()
  import jax  # pylint: disable=import-outside-toplevel
  import t5x_lite  # pylint: disable=import-outside-toplevel
  done = {}
  if mode == "idle":
    _child_mark("BASELINE", hwm_reset=_reset_hwm())
  elif mode == "load":
    src, dtype = argv[1], argv[2]
    _child_mark("BASELINE", hwm_reset=_reset_hwm())
    t0 = time.perf_counter()
    model = t5x_lite.load(src, dtype=dtype, progress=False)
    jax.block_until_ready(model.params)
    done = dict(seconds=time.perf_counter() - t0)
  elif mode in ("export", "save"):
    src, out, dtype = argv[1], argv[2], argv[3]
    model = t5x_lite.load(src, dtype=dtype, progress=False)
    jax.block_until_ready(model.params)
    _malloc_trim()
    _child_mark("BASELINE", hwm_reset=_reset_hwm())
    t0 = time.perf_counter()
    if mode == "export":
      model.save_hf(out, max_shard_bytes=int(argv[4]))
    else:
      model.save(out)
    done = dict(seconds=time.perf_counter() - t0)
  else:
    raise SystemExit(f"unknown child mode {mode!r}")
  if mode != "idle":
    done.update(params_bytes=_params_bytes(model.params), largest_leaf=_largest_leaf(model.params))
  _child_mark("DONE", **done)
  _child_mark("TRIMMED", trimmed=_malloc_trim())


def _build_hf(single_dir: str, sharded_dir: str, layers: str, vocab: str) -> None:
  """T5ForConditionalGeneration at t5-v1_1-small widths (any vocab), untied head, saved single-file and (when
  `sharded_dir` is not "-") with 50 MB shards."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers as tf  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import load_file, save_file  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(2)
  torch.manual_seed(0)
  n = int(layers)
  config = tf.T5Config(vocab_size=int(vocab), d_model=WIDTH["d_model"], d_kv=WIDTH["head_dim"],
                       d_ff=WIDTH["d_ff"], num_heads=WIDTH["num_heads"], num_layers=n, num_decoder_layers=n,
                       feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                       decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
  staging = single_dir + ".staging"
  tf.T5ForConditionalGeneration(config).save_pretrained(staging)
  # transformers 5 drops lm_head.weight on save; add a distinct one the way T5v1.1 ships (as tests/conftest.py).
  path = os.path.join(staging, "model.safetensors")
  tensors = load_file(path)
  tensors["lm_head.weight"] = np.random.default_rng(0).normal(0, 0.05, tensors["shared.weight"].shape
                                                                ).astype(np.float32)
  save_file(tensors, path, metadata={"format": "pt"})
  del tensors
  model = tf.T5ForConditionalGeneration.from_pretrained(staging).eval()
  assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
  model.save_pretrained(single_dir, max_shard_size="50GB")
  if sharded_dir != "-":
    model.save_pretrained(sharded_dir, max_shard_size="50MB")
  shutil.rmtree(staging)
  print(f"@@BUILT {json.dumps({'params': sum(p.numel() for p in model.parameters())})}", flush=True)


def _child_pid(pid: int) -> int | None:
  try:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
      kids = f.read().split()
    return int(kids[0]) if kids else None
  except (OSError, ValueError):
    return None


def _widen_vocab(src_dir: str, out_dir: str, vocab: str) -> None:
  """The checkpoint in `src_dir` with its embedding and lm_head widened to `vocab` rows (random), written the
  way save_pretrained writes it: an mT5-like model whose two vocab-sized leaves dominate its size, built in
  seconds instead of through torch's initialisers."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import load_file, save_file  # pylint: disable=import-outside-toplevel
  n = int(vocab)
  tensors = load_file(os.path.join(src_dir, "model.safetensors"))
  rng = np.random.default_rng(0)
  for name in ("shared.weight", "lm_head.weight"):
    d = tensors[name].shape[1]
    tensors[name] = rng.standard_normal((n, d), dtype=np.float32) * np.float32(0.05)
  os.makedirs(out_dir)
  save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(src_dir, "config.json")) as f:
    config = json.load(f)
  config["vocab_size"] = n
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  print(f"@@BUILT {json.dumps({'params': sum(int(t.size) for t in tensors.values())})}", flush=True)


def run_measured(argv: list[str], *, under_time: bool = False) -> dict:
  """Runs a subprocess, sampling its /proc status every 2 ms; returns its marks and sampled peaks.

  `under_time`: run it as `/usr/bin/time -v ARGV` and sample the process `time` started; `time_maxrss` is then
  the kernel's peak RSS of that process alone. (ru_maxrss of a child forked straight from this process would
  not do: Linux carries the parent's RSS at fork into the child's ru_maxrss, and part 1 leaves this one large.)
  """
  if under_time:
    argv = ["/usr/bin/time", "-v", *argv]
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
             TF_CPP_MIN_LOG_LEVEL="3", TQDM_DISABLE="1")
  t_start = time.monotonic()
  proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  marks, stdout_tail, stderr_lines = {}, [], []

  def read_stdout():
    for line in proc.stdout:
      if line.startswith("@@"):
        name, _, payload = line[2:].partition(" ")
        marks[name] = json.loads(payload)
      else:
        stdout_tail.append(line)

  def read_stderr():
    for line in proc.stderr:
      stderr_lines.append(line)

  threads = [threading.Thread(target=read_stdout, daemon=True), threading.Thread(target=read_stderr, daemon=True)]
  for t in threads:
    t.start()
  samples = []  # (monotonic time, status)
  target = None if under_time else proc.pid
  while True:
    pid, wstatus, _ = os.wait4(proc.pid, os.WNOHANG)
    if pid:
      break
    if target is None:
      target = _child_pid(proc.pid)
      if target is None:
        time.sleep(0.001)
        continue
    s = _status(target)
    if s:
      samples.append((time.monotonic(), s))
    time.sleep(0.002)
  proc.returncode = os.waitstatus_to_exitcode(wstatus)
  for t in threads:
    t.join(timeout=10)
  wall = time.monotonic() - t_start
  if proc.returncode != 0:
    raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}:\n{''.join(stderr_lines[-30:])}")

  def peak(key, since=None, until=None):
    vals = [s.get(key, 0) for t, s in samples if (since is None or t >= since) and (until is None or t <= until)]
    return max(vals) if vals else 0

  base = marks.get("BASELINE")
  since = base["t"] if base else None
  until = marks["DONE"]["t"] if "DONE" in marks else None
  time_maxrss = None
  for line in stderr_lines:
    if "Maximum resident set size (kbytes):" in line:
      time_maxrss = int(line.rsplit(":", 1)[1]) * 1024
  return dict(marks=marks, wall=wall, time_maxrss=time_maxrss, samples=len(samples),
              peak_anon=peak("RssAnon", since, until), peak_file=peak("RssFile", since, until),
              peak_rss=peak("VmRSS", since, until), stderr=stderr_lines)


def _dir_bytes(path: str, suffix: str = ".safetensors") -> int:
  return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(suffix))


def _tree_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _measure_checkpoint(name: str, layers: int, vocab: int, workdir: str, full: bool,
                        widen_from: str | None) -> tuple[list[str], list[dict]]:
  """Builds one HF checkpoint and measures each conversion of it in a fresh process."""
  py, me = sys.executable, os.path.abspath(__file__)
  single, sharded = os.path.join(workdir, f"{name}_single"), os.path.join(workdir, f"{name}_sharded")
  t0 = time.monotonic()
  if widen_from:
    built = run_measured([py, me, "--child", "widen_vocab", os.path.join(workdir, f"{widen_from}_single"), single,
                          str(vocab)])
  else:
    built = run_measured([py, me, "--child", "build_hf", single, sharded if full else "-", str(layers), str(vocab)])
  n_params = built["marks"]["BUILT"]["params"]
  ckpt = _dir_bytes(single)
  print(f"  built {name} ({n_params / 1e6:.0f}M params, {ckpt / MB:.0f} MB) in {time.monotonic() - t0:.1f}s",
        flush=True)

  def measure(label, argv, *, ckpt_bytes, base=None, params=None, leaf=None, kind="load", out=None, under_time=False):
    r = run_measured(argv, under_time=under_time)
    done = r["marks"].get("DONE", {})
    case = dict(label=label, r=r, base=(base or r["marks"]["BASELINE"])["status"], ckpt=ckpt_bytes, kind=kind,
                params=done.get("params_bytes", params), leaf=done.get("largest_leaf", leaf),
                seconds=done.get("seconds", r["wall"]),
                hwm_exact=base is None and r["marks"]["BASELINE"]["hwm_reset"],
                out_bytes=_tree_bytes(out) if out else None)
    print(f"  measured {name}: {label} ({r['wall']:.1f}s)", flush=True)
    return case

  cases = [measure("load, single file, f32", [py, me, "--child", "load", single, "float32"], ckpt_bytes=ckpt)]
  if full:
    n_shards = len([f for f in os.listdir(sharded) if f.endswith(".safetensors")])
    cases.append(measure(f"load, {n_shards} shards of 50 MB, f32", [py, me, "--child", "load", sharded, "float32"],
                         ckpt_bytes=_dir_bytes(sharded)))
  cases.append(measure("load, single file -> bf16", [py, me, "--child", "load", single, "bfloat16"], ckpt_bytes=ckpt))
  if full:
    # The CLI as users run it: its peak from wait4 (ru_maxrss), its baseline from an import-only process.
    idle = run_measured([py, me, "--child", "idle"])
    out = os.path.join(workdir, f"{name}_ours_bf16")
    cases.append(measure("CLI --from-hf --dtype bfloat16", [py, "-m", "t5x_lite.convert", "--from-hf", single,
                                                            "--out", out, "--dtype", "bfloat16"], under_time=True,
                         ckpt_bytes=ckpt, base=idle["marks"]["BASELINE"], params=n_params * 2,
                         leaf=vocab * WIDTH["d_model"] * 2, kind="cli", out=out))
    out = os.path.join(workdir, f"{name}_orbax_bf16")
    cases.append(measure("  of which Model.save (orbax), bf16", [py, me, "--child", "save", single, out, "bfloat16"],
                         ckpt_bytes=ckpt, kind="save", out=out))
  exports = [("Model.save_hf, single file", 2 * 1024 ** 3)]
  if full:
    exports.append(("Model.save_hf, 50 MB shards", 50 * MB))
  for label, shard in exports:
    out = os.path.join(workdir, f"{name}_export_{shard}")
    cases.append(measure(label, [py, me, "--child", "export", single, out, "float32", str(shard)],
                         ckpt_bytes=ckpt, kind="export", out=out))
  how = (f"{widen_from} with shared/lm_head widened to vocab {vocab} by numpy" if widen_from else
         f"transformers T5ForConditionalGeneration save_pretrained, d_model 512, 6x64 heads, gated-gelu d_ff 1024, "
         f"{layers}+{layers} layers, vocab {vocab}, untied head")
  return ([f"{name}: {how}: {n_params / 1e6:.1f}M params, model.safetensors {ckpt / MB:.0f} MB float32"], cases)


def bench_memory(checkpoints: list[tuple], workdir: str) -> list[str]:
  lines, rows, verdicts = [], [], []
  for name, layers, vocab, full, widen_from in checkpoints:
    head, cases = _measure_checkpoint(name, layers, vocab, workdir, full, widen_from)
    lines += head
    for c in cases:
      r, base = c["r"], c["base"]
      if c["kind"] == "cli":
        hwm = r["time_maxrss"] or r["peak_rss"]
      else:  # VmHWM is exact only when it could be reset at the baseline; else the 2 ms samples
        hwm = r["marks"]["DONE"]["status"]["VmHWM"] if c["hwm_exact"] else r["peak_rss"]
      d_total = hwm - base["VmRSS"]
      d_anon = r["peak_anon"] - base["RssAnon"]
      d_file = r["peak_file"] - base["RssFile"]
      marks = r["marks"]
      after = marks["DONE"]["status"]["RssAnon"] - base["RssAnon"] if "DONE" in marks else None
      trimmed = marks["TRIMMED"]["status"]["RssAnon"] - base["RssAnon"] if "TRIMMED" in marks else None
      # Beyond the params: for loads the params are part of the increment; for saves they are in the baseline.
      over = d_anon - c["params"] if c["kind"] in ("load", "cli") else d_anon
      rows.append([name, c["label"], f"{c['ckpt'] / MB:.0f}", f"{c['params'] / MB:.0f}", f"{base['VmRSS'] / MB:.0f}",
                   f"{d_total / MB:.0f} = {d_total / c['ckpt']:.2f}x",
                   f"{d_anon / MB:.0f} = {d_anon / c['ckpt']:.2f}x",
                   f"{over / MB:+.0f} = {over / c['leaf']:.1f}", f"{d_file / MB:.0f}",
                   "-" if after is None else f"{after / MB:.0f} / {trimmed / MB:.0f}", f"{c['seconds']:.1f}"])
      if c["kind"] in ("load", "cli"):
        verdicts.append(
            f"  {name}, {c['label'].strip()}: anon peak {d_anon / MB:.0f} MB = {d_anon / c['params']:.2f}x the "
            f"params = params + {over / c['leaf']:.1f} largest leaves in flight (target ~1); "
            f"{d_anon / c['ckpt']:.2f}x the checkpoint -> {'under' if d_anon < 2 * c['ckpt'] else 'OVER'} 2x; "
            f"with mapped file pages {d_total / c['ckpt']:.2f}x")
      else:
        verdicts.append(
            f"  {name}, {c['label'].strip()}: {over / MB:.0f} MB beyond the loaded params = "
            f"{over / c['params']:.2f}x the params ({over / c['leaf']:.1f} largest leaves)"
            + (f"; wrote {c['out_bytes'] / MB:.0f} MB" if c["out_bytes"] else ""))
  lines.append("")
  lines.append(table(["ckpt", "case", "ckpt MB", "params MB", "base RSS MB", "peak RSS-base MB = x ckpt",
                      "peak anon-base MB = x ckpt", "anon beyond params MB = leaves", "peak file MB",
                      "anon after / trimmed MB", "s"], rows, left=2))
  lines += [
      "",
      "  ckpt MB: *.safetensors bytes read (export: written); params MB: the params pytree (bf16 = half); leaves: in "
      "units of the largest leaf (the embedding / lm_head, vocab x 512).",
      "  base RSS: the process after imports + jax start-up (save/export: after the model is loaded and malloc_trim; "
      "CLI: an import-only process, as the CLI cannot be paused).",
      "  peak RSS: the kernel's exact VmHWM, reset to the baseline at the start of the measured phase (CLI: "
      "/usr/bin/time -v maximum resident set size of the whole run).",
      "  peak anon: RssAnon (malloc heap, numpy and jax CPU buffers), sampled every 2 ms from the parent; 'beyond "
      "params' = peak anon - base - params bytes (save/export: the whole increment, as the params are in base).",
      "  peak file: RssFile increase = safetensors pages memory-mapped by safe_open and touched by reads.",
      "  anon after / trimmed: RssAnon - base once done, before / after gc.collect() + glibc malloc_trim(0) (the "
      "difference is memory waiting for Python's cyclic GC or kept by malloc, not live data).",
      "  Interpretation: the mapped file pages count in RSS while the reader holds the files open, but they are "
      "clean page cache (the kernel can drop them; it is not a copy the converter allocated), so 'total RSS' "
      "can reach ~2x the checkpoint from the mapping alone. The one-copy test is on the anonymous memory: "
      "params + about one leaf in flight.",
      "",
      *verdicts,
  ]
  return lines


# ------------------------------------------------------------------------------------------------- main

def main() -> None:
  if len(sys.argv) > 1 and sys.argv[1] == "--child":
    child_main(sys.argv[2:])
    return
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--reps", type=int, default=3, help="compiles per scanned config (min and median shown)")
  parser.add_argument("--depths", default="2,8,24", help="layers per stack to compile")
  parser.add_argument("--no-unrolled", action="store_true", help="skip the unrolled (Python-loop) contrast")
  parser.add_argument("--hf-layers", type=int, default=8, help="layers per stack of the converted checkpoints")
  parser.add_argument("--no-big-vocab", action="store_true",
                      help="skip the mt5-small-like checkpoint (vocab 250112, ~1.2 GB), where the embedding dominates")
  parser.add_argument("--skip-compile", action="store_true")
  parser.add_argument("--skip-memory", action="store_true")
  args = parser.parse_args()
  depths = sorted(int(d) for d in args.depths.split(","))
  unrolled = [] if args.no_unrolled else [min(depths), max(depths)]

  t_start = time.monotonic()
  out = ["=" * 100, "t5x_lite foundation benchmark", *machine_header(), "=" * 100]
  print("\n".join(out), flush=True)
  if not args.skip_compile:
    print(f"\n[1] compile time vs depth: T5 v1.1-small widths, batch {BATCH}, input {INPUT_LEN}, target "
          f"{TARGET_LEN}, float32 (progress:)", flush=True)
    res = bench_compile(depths, args.reps, unrolled)
    out += ["", f"[1] compile time vs depth (t5-v1_1-small widths: d_model 512, 6x64 heads, gated-gelu d_ff 1024, "
            f"untied head, vocab 32128; batch {BATCH}, input {INPUT_LEN}, target {TARGET_LEN}, float32)",
            "    lower = trace + StableHLO; compile = XLA (wall, and CPU time of this process, which other "
            "processes on the machine disturb far less); 'unrolled' = the same t5.forward with scan_layers swapped "
            "for a Python loop (in this process only); steady = median of 3 runs after the first", ""]
    out += res
  if not args.skip_memory:
    print("\n[2] converter peak memory (subprocesses) (progress:)", flush=True)
    workdir = tempfile.mkdtemp(prefix="bench_foundation_")
    try:
      checkpoints = [("t5-v1_1-small", args.hf_layers, WIDTH["vocab_size"], True, None)]
      if not args.no_big_vocab:
        checkpoints.append(("mt5-small-like", args.hf_layers, 250112, False, "t5-v1_1-small"))
      res = bench_memory(checkpoints, workdir)
    finally:
      shutil.rmtree(workdir, ignore_errors=True)
    out += ["", "[2] converter peak memory, each case in a fresh subprocess", ""] + res
  out += ["", f"total wall time {time.monotonic() - t_start:.0f}s"]
  print("\n" + "\n".join(out), flush=True)


if __name__ == "__main__":
  main()
