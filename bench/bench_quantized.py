"""Weight-only quantized decoding against float32: params bytes and greedy decode tokens/s, one process, same settings.

    .venv/bin/python bench/bench_quantized.py [--models t5,gemma] [--batches 1,8,32] [--reps 2] [--new 32]
                                              [--prompt 64] [--gemma-vocab 262144]

Shapes: t5-v1_1-small (configs/models/t5_1_1_small.gin: 8+8 layers, d_model 512, untied 32128 head) and the Gemma 3
270M text shape (configs/models/gemma3_270m.gin: 18 layers, hidden 640, tied head over 262144 tokens), random
weights (init_params), compute in float32, eos set to vocab-1 so that rows run the full length. Each model runs as:
  float32         the params as initialised;
  bfloat16        t5x_lite.quantize.quantize_params(..., "bfloat16"): matmul weights and embedding stored bfloat16;
  int8 call       quantize="int8", dequantized once per generate call (nn/quant.py DEQUANTIZE="call", CPU default);
  int8 step       quantize="int8", the decoding step multiplies int8 weights and scales its outputs (DEQUANTIZE="step").
Per batch size: e2e = one `generate` call of `--new` greedy tokens after a `--prompt`-token prompt (the encoder's
input for t5), first = the same compiled program stopped after one token, decode tokens/s = batch x (new - 1) /
(e2e - first), the steady rate of the decoding loop; median of `--reps` after a warm-up (which compiles). Variants
alternate within each repetition so that load on the machine hits them alike. The ratio column is the variant's
decode tokens/s over float32's at the same batch size. Params bytes: every array the Model holds (int8 values and
their float32 scales included).
"""

import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from t5x_lite.malloc_tunables import reexec_with_malloc_tunables  # noqa: E402  pylint: disable=wrong-import-position

reexec_with_malloc_tunables()  # as infer.py starts

from t5x_lite.xla_flags import set_cpu_defaults  # noqa: E402  pylint: disable=wrong-import-position

set_cpu_defaults()
import gin  # noqa: E402  pylint: disable=wrong-import-position
import jax  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position

from t5x_lite import generation  # noqa: E402  pylint: disable=wrong-import-position
from t5x_lite import quantize as quantize_lib  # noqa: E402  pylint: disable=wrong-import-position
from t5x_lite.config import GemmaConfig, T5Config  # noqa: E402  pylint: disable=wrong-import-position
from t5x_lite.decoding import buckets  # noqa: E402  pylint: disable=wrong-import-position
from t5x_lite.model import Model  # noqa: E402  pylint: disable=wrong-import-position
from t5x_lite.models.params import init_params  # noqa: E402  pylint: disable=wrong-import-position
from t5x_lite.models.registry import family_of_config  # noqa: E402  pylint: disable=wrong-import-position
from t5x_lite.nn import quant  # noqa: E402  pylint: disable=wrong-import-position

VARIANTS = ("float32", "bfloat16", "int8 call", "int8 step")
MODELS = {"t5": ("t5_1_1_small.gin", T5Config), "gemma": ("gemma3_270m.gin", GemmaConfig)}


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  p.add_argument("--models", default="t5,gemma", help="comma list of t5, gemma")
  p.add_argument("--batches", default="1,8,32")
  p.add_argument("--reps", type=int, default=2, help="timed runs per case (median)")
  p.add_argument("--new", type=int, default=32, help="greedy tokens per call")
  p.add_argument("--prompt", type=int, default=64, help="prompt tokens per row")
  p.add_argument("--gemma-vocab", type=int, default=262144)
  args = p.parse_args()
  args.models = [m.strip() for m in args.models.split(",") if m.strip()]
  for m in args.models:
    if m not in MODELS:
      p.error(f"unknown model {m!r}: use some of {', '.join(MODELS)}")
  args.batches = [int(b) for b in args.batches.split(",")]
  return args


def say(*a):
  print(*a, flush=True)


def table(headers, rows) -> str:
  widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
  fmt = lambda r: "  ".join(str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(r, widths)))
  return "\n".join([fmt(headers), "  ".join("-" * w for w in widths), *map(fmt, rows)])


def build(kind: str, args):
  gin_file, config_class = MODELS[kind]
  gin.clear_config()
  try:
    gin.parse_config_file(os.path.join(REPO, "configs", "models", gin_file))
    config = config_class()
  finally:
    gin.clear_config()
  if kind == "gemma":
    config = config.replace(vocab_size=args.gemma_vocab)
  eos = config.vocab_size - 1
  config = config.replace(eos_token_id=eos)
  params = init_params(family_of_config(config).param_specs(config), jax.random.key(0))
  # The EOS column of the head (the embedding row when tied) is zeroed, so its logit is 0 below the row's largest
  # of thousands of random logits and no row stops early (checked below all the same).
  if config.tie_lm_head:
    params["embed"]["embedding"] = params["embed"]["embedding"].at[eos].set(0.0)
  else:
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"].at[:, eos].set(0.0)
  return config, params


class Runner:
  """One model's variants over the same prompts; each call sets the dequantization mode its variant needs."""

  def __init__(self, config, params, args):
    self.args = args
    self.models = {"float32": Model(config, params)}
    self.models["bfloat16"] = Model(config, quantize_lib.quantize_params(params, config, "bfloat16"),
                                    quantize="bfloat16")
    int8 = Model(config, quantize_lib.quantize_params(params, config, "int8"), quantize="int8")
    self.models["int8 call"] = self.models["int8 step"] = int8
    rng = np.random.default_rng(0)
    self.eos = config.eos_token_id
    self.prompts = rng.integers(3, config.vocab_size - 1, (max(args.batches), args.prompt)).astype(np.int32)

  def _fn(self, variant: str, B: int):
    quant.DEQUANTIZE = variant.split()[1] if variant.startswith("int8") else "auto"
    generation.generate_fn.cache_clear()  # the mode is read when a call is traced
    m = self.models[variant]
    ids, mask, _ = m._bucketed_prompt(self.prompts[:B], None)  # pylint: disable=protected-access
    fn = generation.generate_fn(m.config, max_new=buckets.bucket(self.args.new), method="greedy", temperature=1.0,
                                top_k=0, top_p=1.0, num_beams=4, length_penalty=1.0, brevity="hf")
    done = np.zeros(ids.shape[0], bool)
    return lambda limit: np.asarray(fn(m.params, ids, mask, np.int32(limit), jax.random.key(0), done, {}))

  def run(self, B: int) -> dict:
    fns = {}
    for v in VARIANTS:
      fns[v] = self._fn(v, B)
      fns[v](self.args.new)  # compiles (and warms): the mode is fixed in this program from now on
    e2e, first = {v: [] for v in VARIANTS}, {v: [] for v in VARIANTS}
    tokens = {}
    for _ in range(self.args.reps):
      for v in VARIANTS:
        t = time.perf_counter()
        tokens[v] = fns[v](self.args.new)
        e2e[v].append(time.perf_counter() - t)
        t = time.perf_counter()
        fns[v](1)
        first[v].append(time.perf_counter() - t)
    out = {}
    for v in VARIANTS:
      e, f = statistics.median(e2e[v]), statistics.median(first[v])
      out[v] = {"e2e": e, "first": f, "decode_tps": B * (self.args.new - 1) / max(e - f, 1e-9),
                "e2e_tps": B * self.args.new / e,
                "agree": float(np.mean(tokens[v][:B, :self.args.new] == tokens["float32"][:B, :self.args.new]))}
      stopped = int(np.sum(np.any(tokens[v][:B] == self.eos, axis=1)))
      if stopped:
        say(f"  NOTE {v} batch {B}: {stopped} row(s) emitted EOS early: its timing covers fewer steps")
    return out


def main():
  args = parse_args()
  load = os.getloadavg()
  cpu = "unknown CPU"
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
  say("=" * 100)
  say(f"bench_quantized: greedy decoding, float32 compute, {jax.devices()[0].platform}, {cpu} ({os.cpu_count()} cores, "
      f"load {load[0]:.2f}), jax {jax.__version__}; prompt {args.prompt}, new {args.new}, batches {args.batches}, "
      f"median of {args.reps}")
  say("=" * 100)
  for kind in args.models:
    config, params = build(kind, args)
    runner = Runner(config, params, args)
    say(f"\n### {kind}: {quantize_lib.param_count(params) / 1e6:.1f}M params, vocab {config.vocab_size}")
    f32_bytes = quantize_lib.params_bytes(runner.models["float32"].params)
    rows = [[v, f"{quantize_lib.params_bytes(runner.models[v].params) / 1e6:.1f}",
             f"{quantize_lib.params_bytes(runner.models[v].params) / f32_bytes:.3f}"] for v in VARIANTS[:3]]
    say(table(["stored as", "params MB", "of float32"], rows))
    rows = []
    for B in args.batches:
      r = runner.run(B)
      for v in VARIANTS:
        rows.append([f"{v} B={B}", f"{r[v]['e2e'] * 1e3:.0f}", f"{r[v]['first'] * 1e3:.0f}", f"{r[v]['e2e_tps']:.1f}",
                     f"{r[v]['decode_tps']:.1f}", f"{r[v]['decode_tps'] / r['float32']['decode_tps']:.2f}",
                     f"{r[v]['agree'] * 100:.0f}%"])
      say(table(["variant", "e2e ms", "first ms", "tok/s e2e", "tok/s decode", "ratio", "tokens = f32"], rows[-4:]))
    say(f"\n{kind} summary")
    say(table(["variant", "e2e ms", "first ms", "tok/s e2e", "tok/s decode", "decode vs f32", "tokens = f32"], rows))
    del runner, params
  say("\n(tokens = f32: greedy tokens equal to float32's at the same positions; random weights have near-tied "
      "logits, so this is no accuracy figure: tests/test_quantize.py measures agreement on a trained model)")
  load = os.getloadavg()
  say(f"load average {load[0]:.2f} / {load[1]:.2f} (1 / 5 min) at the end")


if __name__ == "__main__":
  main()
