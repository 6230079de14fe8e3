"""In-flight against static batching on a long-tailed workload, ours and transformers', side by side in one run.

    .venv/bin/python bench/bench_inflight.py [--models t5,gemma] [--requests 512] [--slots 8] [--mean 32] [--cap 256]
                                             [--gemma-vocab 262144] [--no-hf] [--threads N] [--rounds 2]

Workload: `--requests` greedy requests, prompts of 8-64 random tokens, each with its own max_new_tokens drawn from a
geometric distribution of mean `--mean` capped at `--cap` (the long tail of real answer lengths). Shapes: t5-v1_1-small
(untied 32128 head) and the Gemma 3 270M text shape (tied head over `--gemma-vocab` tokens), random float32 weights
built by transformers, saved, and read by both sides. EOS is the last vocabulary id, so requests end at their limits.

Timed (compile time, from jax.monitoring, subtracted from ours and reported apart; ours run `--rounds` times each in
ABBA order and are compared on their summed times, so that a machine whose speed drifts over minutes, as shared
hosts do, favours neither):
  ours inflight   t5x_lite.inflight.generate, `--slots` slots;
  ours static     Model.generate on batches of `--slots` requests in input order, each decoding until its longest
                  row's limit (rows cut at their own limits afterwards);
  hf static       transformers' generate (static cache, flush-denormal, same thread count) on the same batches;
  hf sorted       the same with the requests sorted by max_new_tokens first, so a batch's rows have similar limits:
                  the best batching transformers' generate allows (it has no continuous batching for these models
                  on CPU), and one a user can do since max_new_tokens is part of the request.
Tokens/s counts the tokens requested (each request's own limit). Every greedy answer of ours is checked to be the
same in both batchings. Read bandwidth: the weights one decoding step reads / its time against an XLA streaming
read measured in the same run (MBU). Slot occupancy: requested tokens / (decoding steps x slots).
"""

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from t5x_lite.malloc_tunables import reexec_with_malloc_tunables  # noqa: E402  pylint: disable=wrong-import-position

reexec_with_malloc_tunables()  # as infer.py starts


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--models", default="t5,gemma")
  p.add_argument("--requests", type=int, default=512)
  p.add_argument("--slots", type=int, default=8)
  p.add_argument("--mean", type=float, default=32.0, help="mean of the geometric max_new_tokens")
  p.add_argument("--cap", type=int, default=256, help="largest max_new_tokens")
  p.add_argument("--gemma-vocab", type=int, default=262144)
  p.add_argument("--no-hf", action="store_true")
  p.add_argument("--threads", type=int, default=None)
  p.add_argument("--rounds", type=int, default=2,
                 help="rounds of ours in-flight and static, in ABBA order (in-flight, static, static, in-flight, ...)")
  args = p.parse_args()
  args.models = [m for m in args.models.split(",") if m]
  return args


ARGS = parse_args()
_CORES = sorted(os.sched_getaffinity(0))
if ARGS.threads and ARGS.threads < len(_CORES):
  os.sched_setaffinity(0, set(_CORES[:ARGS.threads]))
THREADS = ARGS.threads or len(_CORES)

from t5x_lite.xla_flags import set_cpu_defaults  # noqa: E402  pylint: disable=wrong-import-position

set_cpu_defaults()
import jax  # noqa: E402  pylint: disable=wrong-import-position
import jax.numpy as jnp  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position
import torch  # noqa: E402  pylint: disable=wrong-import-position
import transformers  # noqa: E402  pylint: disable=wrong-import-position

import t5x_lite  # noqa: E402  pylint: disable=wrong-import-position
from t5x_lite import inflight  # noqa: E402  pylint: disable=wrong-import-position

torch.set_flush_denormal(True)
torch.set_num_threads(THREADS)
transformers.logging.set_verbosity_error()
_COMPILE_S = [0.0]
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **_: _COMPILE_S.__setitem__(0, _COMPILE_S[0] + duration)
    if event.startswith("/jax/core/compile/") else None)


def say(*a):
  print(*a, flush=True)


def hf_model(kind: str):
  torch.manual_seed(0)
  if kind == "t5":
    cfg = transformers.T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_decoder_layers=8,
                                num_heads=6, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                decoder_start_token_id=0, pad_token_id=0, eos_token_id=32127)
    model = transformers.T5ForConditionalGeneration(cfg)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(cfg.vocab_size, cfg.d_model))  # untied, T5's std 1
    return model, {"tie_word_embeddings": False}
  V = ARGS.gemma_vocab
  cfg = transformers.Gemma3TextConfig(
      vocab_size=V, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
      num_key_value_heads=1, head_dim=256, sliding_window=512, query_pre_attn_scalar=256,
      max_position_embeddings=32768, pad_token_id=0, bos_token_id=2, eos_token_id=V - 1)
  return transformers.Gemma3ForCausalLM(cfg), {}


def workload(vocab: int) -> list[inflight.Request]:
  rng = np.random.default_rng(0)
  limits = np.minimum(rng.geometric(1.0 / ARGS.mean, ARGS.requests), ARGS.cap)
  return [inflight.Request(rng.integers(3, vocab - 1, rng.integers(8, 65)).tolist(), int(n)) for n in limits]


def timed(fn):
  """(seconds without jax compilation, compile seconds, result)."""
  before, t = _COMPILE_S[0], time.perf_counter()
  out = fn()
  compile_s = _COMPILE_S[0] - before
  return time.perf_counter() - t - compile_s, compile_s, out


def padded(requests, pad: int, left: bool):
  width = max(len(r.ids) for r in requests)
  ids = np.full((len(requests), width), pad, np.int64)
  mask = np.zeros_like(ids)
  for i, r in enumerate(requests):
    cols = slice(width - len(r.ids), width) if left else slice(0, len(r.ids))
    ids[i, cols], mask[i, cols] = r.ids, 1
  return ids, mask


def batches(n: int, order) -> list[list[int]]:
  return [list(order[i:i + ARGS.slots]) for i in range(0, n, ARGS.slots)]


def ours_static(model, requests) -> dict[int, np.ndarray]:
  out = {}
  for batch in batches(len(requests), range(len(requests))):
    group = [requests[i] for i in batch]
    ids, mask = padded(group, model.config.pad_token_id, left=not model.config.is_encoder_decoder)
    rows = model.generate(ids.astype(np.int32), mask.astype(np.int32), max_new_tokens=max(r.max_new_tokens
                                                                                          for r in group))
    for i, row in zip(batch, rows):
      row = row[:requests[i].max_new_tokens]
      eos = np.flatnonzero(row == model.config.eos_token_id)
      out[i] = row[:eos[0] + 1] if eos.size else row
  return out


def hf_static(model, requests, order, encoder_decoder: bool) -> int:
  """Runs the batches; returns the tokens generated in all (padding rows past a row's own limit included)."""
  steps = 0
  for batch in batches(len(requests), order):
    group = [requests[i] for i in batch]
    ids, mask = padded(group, 0, left=not encoder_decoder)
    new = max(r.max_new_tokens for r in group)
    with torch.inference_mode():
      model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=new,
                     min_new_tokens=new, do_sample=False, cache_implementation="static", pad_token_id=0)
    steps += new
  return steps


def read_bandwidth() -> float:
  x = jnp.ones((64 * 1024 ** 2,), jnp.float32)
  read = jax.jit(jnp.sum)
  read(x).block_until_ready()
  best = min(timed(lambda: read(x).block_until_ready())[0] for _ in range(5))
  return x.nbytes / best


def step_bytes(model) -> int:
  """Weights a decoding step reads: the decoder stack (and its head); T5's encoder and cross k/v kernels run once
  per request, not per step, so they are left out."""
  leaves = jax.tree_util.tree_flatten_with_path(model.params)[0]
  total = 0
  for path, x in leaves:
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if name.startswith("encoder") or "cross_attn/k" in name or "cross_attn/v" in name:
      continue
    total += x.nbytes
  return total


def run(kind: str, tmp: str, bandwidth: float) -> None:
  built, patch = hf_model(kind)
  path = os.path.join(tmp, kind)
  built.save_pretrained(path)
  del built
  with open(os.path.join(path, "config.json")) as f:
    config = json.load(f)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({**config, **patch}, f)
  ours = t5x_lite.load(path, progress=False)
  requests = workload(ours.config.vocab_size)
  tokens = sum(r.max_new_tokens for r in requests)
  say(f"\n### {kind}: {ARGS.requests} requests, max_new_tokens geometric mean {ARGS.mean} cap {ARGS.cap} "
      f"(drawn: mean {tokens / len(requests):.1f}, max {max(r.max_new_tokens for r in requests)}), {ARGS.slots} slots")

  def inflight_run():
    return dict(inflight.generate(ours, requests, slots=ARGS.slots))

  t_in = c_in = t_st = c_st = 0.0
  for r in range(ARGS.rounds):
    for name in ("inflight", "static") if r % 2 == 0 else ("static", "inflight"):
      if name == "inflight":
        t, c, got_in = timed(inflight_run)
        t_in, c_in = t_in + t, c_in + c
      else:
        t, c, got_st = timed(lambda: ours_static(ours, requests))
        t_st, c_st = t_st + t, c_st + c
      say(f"  round {r + 1}: ours {name:<8} {t:7.1f} s (+{c:.1f} s compile), {tokens / t:.1f} tokens/s")
  t_in, t_st = t_in / ARGS.rounds, t_st / ARGS.rounds
  same = sum(np.array_equal(got_in[i], got_st[i]) for i in range(len(requests)))
  static_steps = sum(max(requests[i].max_new_tokens for i in b) for b in batches(len(requests), range(len(requests))))
  rows = [("ours inflight", t_in, c_in), ("ours static", t_st, c_st)]
  if not ARGS.no_hf:
    hf = {"t5": transformers.T5ForConditionalGeneration,
          "gemma": transformers.AutoModelForCausalLM}[kind].from_pretrained(path).eval()
    order = list(range(len(requests)))
    t_hf, _, _ = timed(lambda: hf_static(hf, requests, order, kind == "t5"))
    by_limit = sorted(order, key=lambda i: requests[i].max_new_tokens)
    t_hs, _, _ = timed(lambda: hf_static(hf, requests, by_limit, kind == "t5"))
    rows += [("hf static", t_hf, 0.0), ("hf sorted", t_hs, 0.0)]
    del hf
  say(f"answers equal between our two batchings: {same} / {len(requests)}; requested tokens {tokens}; "
      f"static batches decode {static_steps} steps x {ARGS.slots} rows, in-flight about "
      f"{tokens / ARGS.slots:.0f} steps at full occupancy")
  say(f"{'run':<14} {'seconds':>8} {'compile s':>9} {'tokens/s':>9} {'vs ours static':>14}")
  for name, t, c in rows:
    say(f"{name:<14} {t:8.1f} {c:9.1f} {tokens / t:9.1f} {t_st / t:13.2f}x")
  if not ARGS.no_hf:
    best_hf = min(t_hf, t_hs)
    say(f"in-flight vs static (ours): {t_st / t_in:.2f}x; vs transformers' best batching: {best_hf / t_in:.2f}x")
  per_step = t_in / (tokens / ARGS.slots)
  say(f"in-flight step at full occupancy <= {per_step * 1e3:.1f} ms; weights read per step "
      f"{step_bytes(ours) / 1e6:.0f} MB -> {step_bytes(ours) / per_step / 1e9:.1f} GB/s = "
      f"{step_bytes(ours) / per_step / bandwidth:.0%} of the XLA read bandwidth (MBU)")


def main():
  with open("/proc/cpuinfo") as f:
    cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown CPU")
  bandwidth = read_bandwidth()
  say(f"bench_inflight: {cpu}, {THREADS} threads both sides, load {os.getloadavg()[0]:.2f}; python "
      f"{platform.python_version()}, jax {jax.__version__}, torch {torch.__version__}, transformers "
      f"{transformers.__version__}; XLA read bandwidth {bandwidth / 1e9:.1f} GB/s")
  tmp = tempfile.mkdtemp(prefix="bench_inflight_")
  try:
    for kind in ARGS.models:
      run(kind, tmp, bandwidth)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  say(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  main()
