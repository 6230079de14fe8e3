"""Greedy decoding throughput against transformers (PyTorch, CPU, static KV cache), side by side in one run.

    .venv/bin/python bench/bench_decode.py [--quick] [--models t5,gemma,t5gemma2] [--reps 3] [--gemma-vocab 262144]
                                           [--threads N] [--profile] [--no-hf]

Shapes: t5-v1_1-small (8+8 layers, d_model 512, 6 heads x 64, gated-GELU d_ff 1024, untied 32128 head), the
Gemma 3 270M text shape (18 layers, hidden 640, 4 query heads / 1 kv head x 256, d_ff 2048, tied head over
`--gemma-vocab` tokens, 262144 as published) and the T5Gemma 2 270M-270M text stacks
(configs/models/t5gemma2_270m_270m.gin: 18+18 Gemma 3 layers of that width, window 512, every 6th layer full with
RoPE linear x8, one embedding shared by encoder, decoder and the tied head, also over `--gemma-vocab` tokens; each
decoder layer's one softmax reads its own keys and the encoder's). Text decoding never runs T5Gemma 2's SigLIP
tower, so the benchmark shrinks it (1 layer, hidden 16, image 16, patch 8, 4 tokens per image: 15 K parameters
instead of 417 M) to save memory and build time; nothing timed touches it. Both sides run the same random float32
weights: a transformers model is built from its config and written with `save_pretrained`; transformers
(`from_pretrained`) and t5x_lite (`t5x_lite.load`) then both read that directory.

Each case is batch 1, 8, 32 (`--quick`: 1 and 8) x 128 random prompt tokens (the encoder's input for t5 and
t5gemma2, the prompt for gemma) x 64 greedy new tokens. Timed:
  e2e     the whole `generate` call (encoder / prefill included) -> tokens/s = batch * 64 / e2e;
  first   the same call stopped after the first new token (ours: the same compiled program with its traced
          `limit` at 1; transformers: max_new_tokens=1) -> time to first token;
  step    (e2e - first) / 63, the steady cost of one decoding step -> per-token latency.
Median of `--reps` runs after a warm-up; ours and transformers' runs alternate so that load on the machine hits
both alike. Our compile time (jax's own trace + lower + compile durations, from jax.monitoring) is reported apart.

The peer runs at its best: `torch.set_flush_denormal(True)`, `torch.set_num_threads(N)` with N the number of
cores XLA:CPU uses (one intra-op thread per schedulable core; `--threads` pins this process to fewer cores),
`generate(do_sample=False, cache_implementation="static")`, `attention_mask` passed (encoder-decoders do not infer
it). T5Gemma 2 takes the static cache too (checked on transformers 5.23): its `_prepare_cache_for_generation`
builds an EncoderDecoderCache of two StaticCaches: the decoder's self-attention cache (ring buffers of the window
in its sliding layers) and a cross-attention cache as wide as the encoder's output; the run prints the cache
types it got. transformers compiles nothing on CPU by itself (its auto-compile is for accelerators), so its
decoding runs eagerly. Its encoder-decoders return the start token (T5: 0, T5Gemma 2: bos 2) first; it is dropped
before tokens are compared.

EOS: the saved configs set eos_token_id to vocab-1; every timed output, ours and theirs, is checked to hold 64
real tokens (a row that emits EOS would stop early and the run would not be comparable; the check reports it).

Self-reporting: a 2048^3 float32 matmul peak under XLA and torch and memory bandwidth (XLA read, XLA copy,
numpy copy) are measured in the same run; each decoding step is reported as MFU (useful FLOPs: 2 x weights
touched per token + attention, / step time / peak) and MBU (bytes a step must read: the weights it uses, the tied or
untied V x D head included, and the KV caches at their actual length, i.e. self-attention keys so far (sliding
layers: at most the window) plus, for t5 and t5gemma2, every decoder layer's cached encoder keys and values
(B x 128 x kv heads x head_dim x 2), / step time / XLA read bandwidth) = the fraction of the read-bandwidth
roofline reached. The roofline step is max(bytes / bandwidth, FLOPs / peak); with the encoder / prefill at the
matmul peak it bounds the end-to-end ratio any implementation could reach.

`--profile` then splits one decoding step at batch 8 by kernel kind, from XLA:CPU's own trace.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from t5x_lite.malloc_tunables import reexec_with_malloc_tunables  # noqa: E402  pylint: disable=wrong-import-position

reexec_with_malloc_tunables()  # as infer.py starts (t5x_lite/malloc_tunables.py); the setting serves HF alike

PROMPT, NEW = 128, 64
GB = 1e9
KINDS = ("t5", "gemma", "t5gemma2")  # all run by default
ENCODER_DECODER = ("t5", "t5gemma2")


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="batch 1 and 8 only, 2 timed runs")
  p.add_argument("--models", default=",".join(KINDS), help=f"comma list of {', '.join(KINDS)}")
  p.add_argument("--batches", default=None, help="comma list overriding the batch sizes")
  p.add_argument("--reps", type=int, default=None, help="timed runs per case (default 3; --quick 2)")
  p.add_argument("--gemma-vocab", type=int, default=262144,
                 help="vocabulary of gemma and t5gemma2 (262144 as published; smaller for quick runs)")
  p.add_argument("--threads", type=int, default=None, help="cores for both sides (default: all schedulable)")
  p.add_argument("--profile", action="store_true", help="split a batch-8 decoding step by XLA kernel kind")
  p.add_argument("--no-hf", action="store_true", help="ours only (no transformers runs)")
  args = p.parse_args()
  args.models = [m.strip() for m in args.models.split(",") if m.strip()]
  for m in args.models:
    if m not in KINDS:
      p.error(f"unknown model {m!r}: use some of {', '.join(KINDS)}")
  args.batches = ([int(b) for b in args.batches.split(",")] if args.batches else
                  [1, 8] if args.quick else [1, 8, 32])
  args.reps = args.reps or (2 if args.quick else 3)
  return args


ARGS = parse_args()
_CORES = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count()))
if ARGS.threads and ARGS.threads < len(_CORES):
  os.sched_setaffinity(0, set(_CORES[:ARGS.threads]))  # before jax starts its thread pool
THREADS = ARGS.threads or len(_CORES)

from t5x_lite.xla_flags import set_cpu_defaults  # noqa: E402  pylint: disable=wrong-import-position

set_cpu_defaults()  # as train.py / infer.py run: before JAX initialises its backend
import jax  # noqa: E402  pylint: disable=wrong-import-position
import jax.numpy as jnp  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position
import torch  # noqa: E402  pylint: disable=wrong-import-position
import transformers  # noqa: E402  pylint: disable=wrong-import-position

import t5x_lite  # noqa: E402  pylint: disable=wrong-import-position
from t5x_lite import generation  # noqa: E402  pylint: disable=wrong-import-position
from t5x_lite.decoding import buckets  # noqa: E402  pylint: disable=wrong-import-position

torch.set_flush_denormal(True)
torch.set_num_threads(THREADS)
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

_COMPILE_S = [0.0]  # seconds jax spent tracing, lowering and compiling, summed over the run


def _on_jax_duration(event: str, duration: float, **_) -> None:
  if event.startswith("/jax/core/compile/"):
    _COMPILE_S[0] += duration


jax.monitoring.register_event_duration_secs_listener(_on_jax_duration)


# --------------------------------------------------------------------------------------------- helpers

def table(headers, rows, left=1) -> str:
  widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
  fmt = lambda r: "  ".join(str(x).rjust(w) if i >= left else str(x).ljust(w)
                            for i, (x, w) in enumerate(zip(r, widths)))
  return "\n".join([fmt(headers), "  ".join("-" * w for w in widths), *map(fmt, rows)])


def timed(fn, *args):
  t = time.perf_counter()
  out = fn(*args)
  return time.perf_counter() - t, out


def best_of(fn, n: int) -> float:
  """Median seconds of n calls after one warm-up (fn blocks on its result)."""
  fn()
  return statistics.median(timed(fn)[0] for _ in range(n))


def say(*a):
  print(*a, flush=True)


def header() -> None:
  cpu = "unknown CPU"
  with open("/proc/cpuinfo") as f:
    for line in f:
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024 ** 3
  load = os.getloadavg()
  say("=" * 100)
  say("bench_decode: greedy decoding, t5x_lite (JAX) vs transformers (PyTorch), CPU, float32")
  say(f"machine : {cpu}, {os.cpu_count()} logical cores ({len(_CORES)} schedulable), {mem_gb:.1f} GiB RAM, "
      f"load average {load[0]:.2f} / {load[1]:.2f} (1 / 5 min) at start")
  say(f"threads : {THREADS} on both sides: XLA:CPU one intra-op thread per schedulable core "
      f"({len(os.sched_getaffinity(0))} schedulable now), torch.set_num_threads({torch.get_num_threads()}), "
      f"flush_denormal on")
  say(f"software: python {platform.python_version()}, jax {jax.__version__} ({jax.devices()[0].platform}), "
      f"torch {torch.__version__}, transformers {transformers.__version__}, numpy {np.__version__}")
  say(f"run     : models {','.join(ARGS.models)}, batches {ARGS.batches}, prompt {PROMPT}, new {NEW}, "
      f"{ARGS.reps} timed runs per case (median), gemma / t5gemma2 vocab {ARGS.gemma_vocab}")
  say(f"malloc  : GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES')}")
  say("=" * 100)


# ---------------------------------------------------------------------------------- peaks and bandwidth

def busy_probe(window: float = 0.3) -> tuple[float, float]:
  """Mean seconds of a decode-sized torch matmul with all threads and with one, each over `window` seconds.

  OpenMP (torch) stalls at each parallel region when another process holds one of its cores, so on a busy
  machine the all-threads time is many times the one-thread time and the torch timings around it are not
  trustworthy. The mean over a window (not the best call) is what catches the stalls.
  """
  a, b = torch.randn(8, 512), torch.randn(512, 1024)

  def mean_time():
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < window:
      a @ b
      n += 1
    return (time.perf_counter() - t0) / n

  with torch.inference_mode():
    t_n = mean_time()
    torch.set_num_threads(1)
    t_1 = mean_time()
    torch.set_num_threads(THREADS)
  return t_n, t_1


def measure_bandwidth(words: int) -> dict:
  """Seconds to read (XLA sum, torch sum), copy (XLA in place, numpy) and matmul-read `words` float32 values."""
  x = jnp.ones((words,), jnp.float32)
  read = jax.jit(jnp.sum)
  copy = jax.jit(lambda v: v + 1.0, donate_argnums=0)  # in place: no fresh pages to fault in
  xla_read = best_of(lambda: read(x).block_until_ready(), 5)
  box = [x]

  def copy_step():
    box[0] = copy(box[0]).block_until_ready()

  xla_copy = best_of(copy_step, 5)
  x = box[0]
  src, dst = np.ones(words, np.float32), np.empty(words, np.float32)
  np_copy = best_of(lambda: np.copyto(dst, src), 5)
  tx = torch.ones(words)
  with torch.inference_mode():
    torch_read = best_of(lambda: tx.sum(), 5)
  # How fast XLA:CPU's matmul itself reads weights at a decoding batch size, beside the streaming read above; the
  # rooflines are also given against it.
  w = jnp.ones((words // 2048, 2048), jnp.float32)
  v = jnp.ones((2048, 8), jnp.float32)
  matvec = jax.jit(lambda w, v: w @ v)
  xla_matvec = best_of(lambda: matvec(w, v).block_until_ready(), 5)
  return {"xla_read": xla_read, "xla_copy": xla_copy, "np_copy": np_copy, "torch_read": torch_read,
          "xla_matvec": xla_matvec}


def measure_peaks() -> dict:
  """Matmul peak (XLA, torch) and memory bandwidth, plus a probe of how busy the machine is."""
  n = 2048
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  mm = jax.jit(lambda a, b: a @ b)
  xla_mm = best_of(lambda: mm(a, b).block_until_ready(), 5)
  ta, tb = torch.randn(n, n), torch.randn(n, n)
  with torch.inference_mode():
    torch_mm = best_of(lambda: ta @ tb, 5)
  flops = 2 * n ** 3
  words = 64 * 1024 ** 2  # 256 MiB of float32
  bw = measure_bandwidth(words)  # its arrays (1.3 GB) are freed on return, before the probe
  small_n, small_1 = busy_probe()
  bytes_ = words * 4
  p = {"xla_peak": flops / xla_mm, "torch_peak": flops / torch_mm, "xla_read_bw": bytes_ / bw["xla_read"],
       "xla_matvec_bw": bytes_ / bw["xla_matvec"], "xla_copy_bw": 2 * bytes_ / bw["xla_copy"],
       "np_copy_bw": 2 * bytes_ / bw["np_copy"], "torch_read_bw": bytes_ / bw["torch_read"],
       "small_n": small_n, "small_1": small_1}
  say(f"matmul peak (2048^3 f32): XLA {p['xla_peak'] / GB:.1f} GFLOP/s, torch {p['torch_peak'] / GB:.1f} GFLOP/s")
  say(f"bandwidth (256 MiB f32): XLA read {p['xla_read_bw'] / GB:.1f} GB/s, XLA copy {p['xla_copy_bw'] / GB:.1f} "
      f"GB/s (read+write), numpy copy {p['np_copy_bw'] / GB:.1f} GB/s, torch read {p['torch_read_bw'] / GB:.1f} GB/s"
      " -> rooflines use the XLA read bandwidth")
  say(f"XLA matmul weight read, (32768x2048)@(2048x8) f32: {p['xla_matvec_bw'] / GB:.1f} GB/s "
      "(the rate XLA's own kernels reach at decoding batch sizes)")
  say(f"busy probe: torch (8x512)@(512x1024), mean over 0.3 s: {small_n * 1e3:.3f} ms with {THREADS} threads, "
      f"{small_1 * 1e3:.3f} ms with 1 ({small_n / small_1:.1f}x; far above 1 = other processes hold the cores)")
  if THREADS > 1 and small_n > 3 * small_1:
    say(f"WARNING: the machine is oversubscribed (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores): "
        f"torch's {THREADS} OpenMP threads stall at every parallel region, so transformers is slowed far more "
        "than XLA and the ratios below flatter us. Rerun on an idle machine (or compare with --threads 1).")
  return p


# ------------------------------------------------------------------------------------------ the models

def build_t5():
  """t5-v1_1-small with its untied head. transformers 5.x always ties T5's head at construction (the config's
  tie_word_embeddings only picks the output scaling), so the head gets its own weights and the saved config says
  tie_word_embeddings=false, as google/t5-v1_1-small's does; from_pretrained then keeps both (untied)."""
  cfg = transformers.T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_decoder_layers=8,
                              num_heads=6, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                              decoder_start_token_id=0, pad_token_id=0, eos_token_id=32127)
  torch.manual_seed(0)
  model = transformers.T5ForConditionalGeneration(cfg)
  model.lm_head.weight = torch.nn.Parameter(torch.randn(cfg.vocab_size, cfg.d_model))  # T5's init: std 1
  return model, {"tie_word_embeddings": False}


def build_gemma():
  """The Gemma 3 270M text shape (tied head), with `--gemma-vocab` tokens."""
  V = ARGS.gemma_vocab
  cfg = transformers.Gemma3TextConfig(
      vocab_size=V, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
      num_key_value_heads=1, head_dim=256, sliding_window=512, query_pre_attn_scalar=256,
      max_position_embeddings=32768, pad_token_id=0, bos_token_id=2, eos_token_id=V - 1)
  torch.manual_seed(0)
  return transformers.Gemma3ForCausalLM(cfg), {}


def build_t5gemma2():
  """The T5Gemma 2 270M-270M text stacks as configs/models/t5gemma2_270m_270m.gin gives them, with `--gemma-vocab`
  tokens and eos vocab-1, exported by our converter's config writer (t5gemma2_config_to_hf). The SigLIP tower and
  projector are shrunk (text decoding never runs them); the special image ids stay as published (out of range
  under a smaller vocabulary, where no prompt holds them)."""
  import gin  # pylint: disable=import-outside-toplevel
  from t5x_lite.config import T5Gemma2Config, t5gemma2_config_to_hf  # pylint: disable=import-outside-toplevel
  from t5x_lite.config.siglip import SiglipVisionConfig  # pylint: disable=import-outside-toplevel
  V = ARGS.gemma_vocab
  gin.clear_config()
  try:
    gin.parse_config_file(os.path.join(REPO, "configs", "models", "t5gemma2_270m_270m.gin"))
    c = T5Gemma2Config()
  finally:
    gin.clear_config()
  c = c.replace(encoder=c.encoder.replace(vocab_size=V), decoder=c.decoder.replace(vocab_size=V), eos_token_id=V - 1,
                vision=SiglipVisionConfig(hidden_size=16, intermediate_size=16, num_layers=1, num_heads=1,
                                          image_size=16, patch_size=8),
                mm_tokens_per_image=4)
  cfg = transformers.T5Gemma2Config.from_dict(t5gemma2_config_to_hf(c))
  torch.manual_seed(0)
  return transformers.T5Gemma2ForConditionalGeneration(cfg), {}


def count_costs(kind: str, c, B: int) -> dict:
  """Useful FLOPs and minimal bytes per decoding step (averaged over the 64 steps), and prefill FLOPs.

  Only what a step must touch: weights used per token (the projections of the encoder's keys and values, T5's
  cross-attention and T5Gemma 2's shared k/v, run once, in the prefill), the embedding row, KV caches at their
  actual length (not the static cache's full width; sliding layers at most the window) and the encoder's cached
  keys and values (B x 128 x kv heads x head_dim x 2 per decoder layer), f32.
  """
  f4 = 4
  if kind == "t5":
    D, N, H, F, V, L, Le = c.d_model, c.num_heads, c.head_dim, c.d_ff, c.vocab_size, c.num_decoder_layers, \
        c.num_encoder_layers
    ff = (3 if c.mlp_gated else 2) * D * F
    matmul = L * (6 * D * N * H + ff) + D * V  # self q,k,v,o + cross q,o + MLP, per layer; the head
    other = L * 3 * D + D + D  # norms, final norm, embedding row
    keys = [t + 1 for t in range(NEW)]  # self-attention keys at step t (the 64 steps include the start token)
    attn_flops = statistics.mean(L * 4 * N * H * (k + PROMPT) for k in keys)
    cache_elems = statistics.mean(L * 2 * N * H * (k + PROMPT) for k in keys)
    enc_matmul = Le * (4 * D * N * H + ff)
    prefill = B * PROMPT * 2 * (enc_matmul + L * 2 * D * N * H) + B * Le * 4 * N * H * PROMPT ** 2
    steps = NEW
  elif kind == "gemma":
    D, N, K, H, F, V, L = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, c.d_ff, c.vocab_size, c.num_layers
    layer = D * N * H * 2 + 2 * D * K * H + 3 * D * F
    matmul = L * layer + D * V
    other = L * (4 * D + 2 * H) + D + D
    W = c.sliding_window or 10 ** 9
    keys = [PROMPT + t + 1 for t in range(NEW - 1)]  # 63 steps after the prefill
    slide = sum(c.sliding_layers)
    attn_flops = statistics.mean(4 * N * H * ((L - slide) * k + slide * min(k, W)) for k in keys)
    cache_elems = statistics.mean(2 * K * H * ((L - slide) * k + slide * min(k, W)) for k in keys)
    prefill = B * PROMPT * 2 * (L * layer) + B * L * 4 * N * H * PROMPT ** 2 // 2 + B * 2 * D * V
    steps = NEW - 1
  else:  # t5gemma2: a Gemma 3 decoder whose one softmax per layer also reads the encoder's keys and values
    d, e = c.decoder, c.encoder
    D, N, K, H, F, V, L = d.d_model, d.num_heads, d.num_kv_heads, d.head_dim, d.d_ff, d.vocab_size, d.num_layers
    layer = D * N * H * 2 + 2 * D * K * H + 3 * D * F  # q, o; the new token's own k, v; the gated MLP
    matmul = L * layer + D * V  # the tied head reads the whole V x D table every step
    other = L * (4 * D + 2 * H) + D + D  # sandwich norms, q/k norms, final norm, embedding row
    W = d.sliding_window or 10 ** 9
    slide = sum(d.sliding_layers)
    keys = [t + 1 for t in range(NEW)]  # self-attention keys at step t (the 64 steps start from the start token)
    per_row = [(L - slide) * k + slide * min(k, W) + L * PROMPT for k in keys]  # self (ring) + encoder keys
    attn_flops = statistics.mean(4 * N * H * n for n in per_row)
    cache_elems = statistics.mean(2 * K * H * n for n in per_row)
    # Prefill: the encoder (bidirectional; a sliding layer's query sees offsets [-((w+1)//2 - 1), w//2]) and every
    # decoder layer's k/v projection of its output.
    Le, Ne, He, Ke, Fe = e.num_layers, e.num_heads, e.head_dim, e.num_kv_heads, e.d_ff
    we = e.sliding_window or 10 ** 9
    slide_e = sum(e.sliding_layers)
    window_pairs = sum(min(PROMPT - 1, i + we // 2) - max(0, i - ((we + 1) // 2 - 1)) + 1 for i in range(PROMPT))
    enc_layer = D * Ne * He * 2 + 2 * D * Ke * He + 3 * D * Fe
    prefill = (B * PROMPT * 2 * (Le * enc_layer + L * 2 * D * K * H)
               + B * 4 * Ne * He * ((Le - slide_e) * PROMPT ** 2 + slide_e * window_pairs))
    steps = NEW
  return {"flops": B * (2 * matmul + attn_flops), "weight_bytes": f4 * (matmul + other),
          "cache_bytes": f4 * B * cache_elems, "bytes": f4 * (matmul + other) + f4 * B * cache_elems,
          "prefill_flops": prefill, "steps": steps}


# ------------------------------------------------------------------------------------------- one case

class Case:
  """One model: the transformers twin, ours loaded from its save_pretrained directory, and the prompts."""

  def __init__(self, kind: str, tmp_root: str):
    self.kind = kind
    t = time.perf_counter()
    built, patch = {"t5": build_t5, "gemma": build_gemma, "t5gemma2": build_t5gemma2}[kind]()
    self.dir = os.path.join(tmp_root, kind)
    built.save_pretrained(self.dir)
    del built
    path = os.path.join(self.dir, "config.json")
    with open(path) as f:
      hf_config = json.load(f)
    with open(path, "w") as f:
      json.dump({**hf_config, **patch}, f, indent=2)
    # Both sides read the same files.
    self.hf = {"t5": transformers.T5ForConditionalGeneration, "gemma": transformers.AutoModelForCausalLM,
               "t5gemma2": transformers.T5Gemma2ForConditionalGeneration}[kind].from_pretrained(self.dir)
    self.hf.eval()
    t_save = time.perf_counter() - t
    t, self.ours = timed(lambda: t5x_lite.load(self.dir, progress=False))
    c = self.ours.config
    self.eos = c.eos_token_id
    n_params = sum(p.numel() for p in self.hf.parameters())
    tied = self.hf.get_output_embeddings().weight.data_ptr() == self.hf.get_input_embeddings().weight.data_ptr()
    ours_tied = (c.decoder if kind == "t5gemma2" else c).tie_lm_head
    say(f"\n### {kind}: {type(self.hf).__name__}, {n_params / 1e6:.1f}M params, head {'tied' if tied else 'untied'} "
        f"(ours: {'tied' if ours_tied else 'untied'}) "
        f"({n_params * 4 / 1e6:.0f} MB f32), vocab {c.vocab_size}; built+saved {t_save:.1f} s, "
        f"t5x_lite.load {t:.1f} s; eos id {self.eos}")
    if kind == "t5gemma2":
      vision = sum(p.numel() for n, p in self.hf.named_parameters() if "vision_tower" in n or "multi_modal" in n)
      say(f"  SigLIP tower + projector shrunk to {vision} params (never run by text decoding)")
    rng = np.random.default_rng(0)
    self.prompts = rng.integers(3, c.vocab_size - 1, (max(ARGS.batches), PROMPT)).astype(np.int32)
    self.hf_cache = "static"
    if not ARGS.no_hf:
      self.probe_hf_cache()

  def probe_hf_cache(self):
    """transformers' static cache if this model takes one, else its default cache; print what it got."""
    ids = torch.from_numpy(self.prompts[:1].astype(np.int64))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False, eos_token_id=self.eos,
              pad_token_id=0, return_dict_in_generate=True)
    with torch.inference_mode():
      try:
        out = self.hf.generate(ids, cache_implementation="static", **kw)
      except Exception as e:  # pylint: disable=broad-exception-caught
        say(f"  NOTE transformers: cache_implementation='static' failed for {self.kind} ({type(e).__name__}: "
            f"{str(e)[:200]}); it runs with its default cache")
        self.hf_cache = None
        out = self.hf.generate(ids, **kw)
    cache = out.past_key_values

    def describe(x):
      return f"{type(x).__name__}({', '.join(sorted({type(layer).__name__ for layer in getattr(x, 'layers', [])}))})"

    what = (f"{type(cache).__name__} of self {describe(cache.self_attention_cache)} + cross "
            f"{describe(cache.cross_attention_cache)}" if hasattr(cache, "cross_attention_cache") else describe(cache))
    say(f"  transformers cache (cache_implementation={self.hf_cache!r}): {what}")

  # ours ------------------------------------------------------------------------------------------------
  def ours_generate(self, B):
    return self.ours.generate(self.prompts[:B], np.ones((B, PROMPT), np.int32), max_new_tokens=NEW)

  def ours_first(self, B):
    """The same compiled program as `generate`, its traced limit at 1: encoder/prefill and the first token."""
    m = self.ours
    # pylint: disable-next=protected-access
    ids, mask, _ = m._bucketed_prompt(self.prompts[:B], np.ones((B, PROMPT), np.int32))
    fn = generation.generate_fn(m.config, max_new=buckets.bucket(NEW), method="greedy", temperature=1.0, top_k=0,
                                top_p=1.0, num_beams=4, length_penalty=1.0, brevity="hf")
    out = fn(m.params, ids, mask, np.int32(1), jax.random.key(0), np.zeros(ids.shape[0], bool), {})
    return np.asarray(out)

  # transformers ----------------------------------------------------------------------------------------
  def hf_generate(self, B, new=NEW):
    ids = torch.from_numpy(self.prompts[:B].astype(np.int64))
    with torch.inference_mode():
      out = self.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                             cache_implementation=self.hf_cache, eos_token_id=self.eos, pad_token_id=0)
    out = out.numpy()
    # drop an encoder-decoder's start token (T5: 0, T5Gemma 2: 2) / a decoder-only model's prompt
    return out[:, 1:] if self.kind in ENCODER_DECODER else out[:, PROMPT:]

  def check(self, who, tokens, B):
    """Number of rows that stopped early (EOS before 64 tokens)."""
    short = B if tokens.shape[1] < NEW else int(np.sum(np.any(tokens == self.eos, axis=1)))
    if short:
      say(f"  NOTE {who} batch {B}: {short} row(s) emitted EOS (id {self.eos}) before {NEW} tokens")
    return short

  def run(self, B: int) -> dict:
    p_n, p_1 = busy_probe()
    r = {"B": B, "busy": p_n / p_1, "load": os.getloadavg()[0]}
    compiled_before = _COMPILE_S[0]
    ours = self.ours_generate(B)  # compiles
    self.ours_first(B)  # the same program: should not compile again
    r["compile"] = _COMPILE_S[0] - compiled_before
    r["early_ours"] = self.check("ours", ours, B)
    if not ARGS.no_hf:
      self.hf_generate(B, new=2)  # warm-up: allocations, first-call paths
    o64, o1, h64, h1 = [], [], [], []
    for rep in range(ARGS.reps):
      o64.append(timed(lambda: self.ours_generate(B))[0])
      if not ARGS.no_hf:
        t, hf = timed(lambda: self.hf_generate(B))
        h64.append(t)
        if rep == 0:
          r["early_hf"] = self.check("transformers", hf, B)
          same_rows = np.all(ours == hf, axis=1)
          r["rows_equal"], r["token_agree"] = int(same_rows.sum()), float(np.mean(ours == hf))
          r["first_diff"] = [int(np.argmax(ours[i] != hf[i])) for i in np.flatnonzero(~same_rows)]
      o1.append(timed(lambda: self.ours_first(B))[0])
      if not ARGS.no_hf:
        h1.append(timed(lambda: self.hf_generate(B, new=1))[0])
    med = statistics.median
    r["ours_e2e"], r["ours_first"] = med(o64), med(o1)
    r["ours_step"] = (r["ours_e2e"] - r["ours_first"]) / (NEW - 1)
    if not ARGS.no_hf:
      r["hf_e2e"], r["hf_first"] = med(h64), med(h1)
      r["hf_step"] = (r["hf_e2e"] - r["hf_first"]) / (NEW - 1)
    p_n, p_1 = busy_probe()
    r["busy"] = max(r["busy"], p_n / p_1)  # probed before and after the case
    r["costs"] = count_costs(self.kind, self.ours.config, B)
    line = (f"  batch {B:2d}: ours e2e {r['ours_e2e']:.3f} s (runs {min(o64):.3f}-{max(o64):.3f}), first "
            f"{r['ours_first']:.3f} s, step {r['ours_step'] * 1e3:.1f} ms, compile {r['compile']:.1f} s")
    if not ARGS.no_hf:
      line += (f" | transformers e2e {r['hf_e2e']:.3f} s (runs {min(h64):.3f}-{max(h64):.3f}), first "
               f"{r['hf_first']:.3f} s, step {r['hf_step'] * 1e3:.1f} ms | rows equal {r['rows_equal']}/{B}")
    line += f" | load {r['load']:.1f}, busy probe {r['busy']:.1f}x"
    say(line)
    return r


# --------------------------------------------------------------------------------------------- reports

def report(kind: str, results: list[dict], peaks: dict) -> None:
  hf = not ARGS.no_hf
  say(f"\n{kind}: throughput (tokens/s = batch x {NEW} / time), latency, agreement")
  rows = []
  for r in results:
    B = r["B"]
    row = [B, f"{B * NEW / r['ours_e2e']:.1f}", f"{B / r['ours_step']:.1f}", f"{r['ours_step'] * 1e3:.1f}",
           f"{r['ours_first'] * 1e3:.0f}"]
    if hf:
      row += [f"{B * NEW / r['hf_e2e']:.1f}", f"{B / r['hf_step']:.1f}", f"{r['hf_step'] * 1e3:.1f}",
              f"{r['hf_first'] * 1e3:.0f}", f"{r['hf_e2e'] / r['ours_e2e']:.2f}x",
              f"{r['hf_step'] / r['ours_step']:.2f}x",
              f"{r['rows_equal']}/{B} ({r['token_agree'] * 100:.1f}%)"]
    rows.append(row)
  heads = ["batch", "ours tok/s e2e", "ours tok/s decode", "ours ms/step", "ours first ms"]
  if hf:
    heads += ["HF tok/s e2e", "HF tok/s decode", "HF ms/step", "HF first ms", "ratio e2e", "ratio step",
              "rows equal (tokens)"]
  say(table(heads, rows))
  for r in results:
    if hf and r["first_diff"]:
      say(f"  batch {r['B']}: differing rows first differ at new-token positions {r['first_diff']} (greedy on "
          "random weights: near-tied logits, float summation order)")

  say(f"\n{kind}: per-step efficiency and roofline (bytes a step must read: weights + KV caches at actual length"
      f"{', encoder K/V included' if kind in ENCODER_DECODER else ''}; MBU = fraction of the read-bandwidth roofline)")
  rows = []
  for r in results:
    c = r["costs"]
    bw, peak = peaks["xla_read_bw"], peaks["xla_peak"]
    roof_bw, roof_fl = c["bytes"] / bw, c["flops"] / peak
    roof = max(roof_bw, roof_fl)
    roof_e2e = c["prefill_flops"] / peak + c["steps"] * roof
    r["roof_step"], r["roof_e2e"] = roof, roof_e2e
    row = [r["B"], f"{c['flops'] / 1e9:.2f}", f"{c['weight_bytes'] / 1e6:.0f}+{c['cache_bytes'] / 1e6:.0f}",
           f"{roof_bw * 1e3:.1f}/{roof_fl * 1e3:.1f}", f"{c['flops'] / r['ours_step'] / peak * 100:.1f}%",
           f"{c['bytes'] / r['ours_step'] / bw * 100:.0f}%"]
    if hf:
      row += [f"{c['flops'] / r['hf_step'] / peaks['torch_peak'] * 100:.1f}%",
              f"{c['bytes'] / r['hf_step'] / peaks['torch_read_bw'] * 100:.0f}%",
              f"{r['hf_step'] / roof:.1f}x", f"{r['hf_e2e'] / roof_e2e:.1f}x",
              f"{r['hf_step'] / max(c['bytes'] / peaks['xla_matvec_bw'], roof_fl):.1f}x"]
    rows.append(row)
  heads = ["batch", "GFLOP/step", "MB/step w+kv", "roof ms bw/flop", "ours MFU", "ours MBU"]
  if hf:
    heads += ["HF MFU", "HF MBU", "best step ratio", "best e2e ratio", "best step, XLA matmul bw"]
  say(table(heads, rows))
  say("  (MFU vs each side's own 2048^3 matmul peak; MBU vs each side's own read bandwidth; best ratios = "
      "transformers' time / roofline time, the encoder or prefill at the XLA matmul peak; the last column puts the "
      "weight and cache reads at the XLA matmul read rate instead)")


def targets(all_results: dict) -> None:
  if ARGS.no_hf:
    return
  say("\n" + "=" * 100)
  say("TARGETS (issue): >= 5x transformers' tokens/s at batch 8 and 32; <= 1/3 of its per-token latency at batch 1")
  rows = []
  for kind, results in all_results.items():
    for r in results:
      e2e, step = r["hf_e2e"] / r["ours_e2e"], r["hf_step"] / r["ours_step"]
      if r["B"] == 1:
        goal = "latency <= 1/3"
        verdict = (f"step latency {'reached' if step >= 3 else 'not reached'} ({1 / step:.2f} of HF); "
                   f"e2e/64 {'reached' if e2e >= 3 else 'not reached'} ({1 / e2e:.2f})")
      else:
        goal = "5x tokens/s"
        verdict = (f"e2e {'reached' if e2e >= 5 else 'not reached'} ({e2e:.1f}x, best possible "
                   f"{r['hf_e2e'] / r['roof_e2e']:.1f}x); decode-only {'reached' if step >= 5 else 'not reached'} "
                   f"({step:.1f}x, best possible {r['hf_step'] / r['roof_step']:.1f}x)")
      rows.append([kind, r["B"], goal, verdict])
  say(table(["model", "batch", "target", "result (e2e = whole generate call; step = one decoding step)"], rows, 4))
  busy = [f"{kind} batch {r['B']} ({r['busy']:.0f}x)" for kind, results in all_results.items() for r in results
          if THREADS > 1 and r["busy"] > 3]
  if busy:
    say(f"WARNING: other processes held the cores during {', '.join(busy)} (busy probe: torch's {THREADS}-thread "
        "matmul that many times slower than 1-thread): transformers' OpenMP threads stall there, so those ratios "
        "flatter us. Compare a run with --threads 1, where neither side waits for a second thread.")
  for kind, results in all_results.items():
    for r in results:
      if r["B"] > 1:
        say(f"{kind} 5x at batch {r['B']}: {'reached' if r['hf_e2e'] / r['ours_e2e'] >= 5 else 'not reached'} "
            f"({r['hf_e2e'] / r['ours_e2e']:.1f}x e2e, {r['hf_step'] / r['ours_step']:.1f}x per step)")
      else:
        say(f"{kind} 1/3 latency at batch 1: "
            f"{'reached' if r['hf_step'] / r['ours_step'] >= 3 else 'not reached'} "
            f"({r['ours_step'] * 1e3:.1f} vs {r['hf_step'] * 1e3:.1f} ms per step = "
            f"{r['ours_step'] / r['hf_step']:.2f}; e2e/64: {r['ours_e2e'] / r['hf_e2e']:.2f})")


# --------------------------------------------------------------------------------------------- profile

def profile_steps(case: "Case", B: int = 8) -> None:
  """Where one decoding step goes: XLA:CPU's own per-kernel trace (jax.profiler) of a whole `generate` call
  minus that of the same call stopped after the first token, per kernel kind, divided by the 63 extra steps.

  Tracing adds a fixed cost per kernel, so the per-kind times sum to more than the untraced step; the shares
  and the kernel count are the point.
  """
  import collections  # pylint: disable=import-outside-toplevel
  import glob  # pylint: disable=import-outside-toplevel
  import gzip  # pylint: disable=import-outside-toplevel
  import re  # pylint: disable=import-outside-toplevel

  def kernel_times(fn) -> tuple[collections.Counter, collections.Counter]:
    fn()  # compiled and warm
    out = tempfile.mkdtemp(prefix="bench_decode_trace_")
    try:
      jax.profiler.start_trace(out, create_perfetto_trace=True)
      fn()
      jax.profiler.stop_trace()
      with gzip.open(glob.glob(os.path.join(out, "**", "*perfetto_trace.json.gz"), recursive=True)[0]) as f:
        events = json.load(f)
    finally:
      shutil.rmtree(out, ignore_errors=True)
    events = events["traceEvents"] if isinstance(events, dict) else events
    total, count = collections.Counter(), collections.Counter()
    for e in events:
      name = e.get("name", "")
      if e.get("ph") != "X" or name.startswith(("ThunkExecutor", "$", "end: ")) or "Await" in name:
        continue
      kind = re.sub(r"[\d.]+$", "", name)  # dot.712 -> dot, copy_bitcast_fusion.4 -> copy_bitcast_fusion
      total[kind] += e.get("dur", 0) * 1e-6
      count[kind] += 1
    return total, count

  full_t, full_n = kernel_times(lambda: case.ours_generate(B))
  first_t, first_n = kernel_times(lambda: case.ours_first(B))
  steps = NEW - 1
  per_t = {k: (full_t[k] - first_t[k]) / steps for k in full_t}
  per_n = {k: (full_n[k] - first_n[k]) / steps for k in full_n}
  total = sum(v for v in per_t.values() if v > 0)
  say(f"\n### profile: one {case.kind} decoding step at batch {B}, XLA:CPU kernel trace, per step "
      f"({sum(per_n.values()):.0f} kernels, {total * 1e3:.2f} ms traced)")
  rows = [[k, f"{per_n[k]:.0f}", f"{v * 1e3:.3f}", f"{v / total:.0%}"]
          for k, v in sorted(per_t.items(), key=lambda kv: -kv[1])[:12]]
  say(table(["kernel kind", "per step", "ms per step", "share"], rows, 1))


# ------------------------------------------------------------------------------------------------ main

def main():
  header()
  peaks = measure_peaks()
  all_results = {}
  tmp = tempfile.mkdtemp(prefix="bench_decode_")
  try:
    for kind in ARGS.models:
      case = Case(kind, tmp)
      all_results[kind] = [case.run(B) for B in ARGS.batches]
      report(kind, all_results[kind], peaks)
      if ARGS.profile:
        profile_steps(case)
      del case
      shutil.rmtree(os.path.join(tmp, kind), ignore_errors=True)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  targets(all_results)
  load = os.getloadavg()
  say(f"\nload average {load[0]:.2f} / {load[1]:.2f} (1 / 5 min) at the end")


if __name__ == "__main__":
  main()
