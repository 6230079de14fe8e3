"""Batched, sharded inference over JSONL: generate text or score targets with any supported model.

  python infer.py --model PATH --input IN.jsonl --output OUT.jsonl [--batch-size N] [--max-new-tokens N]
                  [--method greedy|sample|beam] [--mesh data:4,tensor:2] [--mode generate|score]
                  [--batching inflight|static] [--quantize int8|bfloat16]
  multi-host: the same command on every host, plus --coordinator_address=HOST:PORT --num_processes=N
              --process_id=I: the model is sharded over every host's devices (--mesh, default fsdp over all of
              them), every host runs each batch, process 0 alone writes the output

Input (--input): one JSON object per line holding its input under "text" (a string), "input_ids" (a list of token
ids) or "inputs" (either: the name train.py's seq2seq records use), and for --mode score its target under "target"
or "targets" (a string or ids). Output: one line per input line, in order: {"output": text, "output_ids": [...]}
or {"score": float}; a line that cannot be processed (bad JSON, no input key, two spellings of one field such as
"text" and "inputs", ...) gets {"error": ...} and the run goes on.
A model with a vision tower (T5Gemma 2) reads images: "images": ["photo.jpg", ...] (paths relative to the input
file's folder), one per <start_of_image> in the text, which expands as transformers' processor expands it (ids
must already hold the image tokens). A missing, unreadable or corrupt image, or a count that does not match, gives
that line an error naming the file; lines with and without images share batches.

Generation runs with in-flight batching (--batching inflight, the default): --batch-size slots each decode one
line, and when a line ends (EOS or its max_new_tokens) the next line takes its slot, so short answers never wait for
long ones. Beam search always runs in static batches (a batch decodes until its longest row ends), as does
--batching static. A line may give its own "max_new_tokens", "method" ("greedy" or "sample"), "temperature",
"top_k", "top_p" and "seed"; the flags are the defaults. A sampling line draws with its own "seed", else with --seed
and its line number: the same draws whichever lines share the slots, and on a resumed run.

The output is appended in input order as lines finish (and fsync'd), so rerunning the same command after an
interruption completes the file. OUT.jsonl.run records what produced the answers (the model's files, the tokenizer,
the settings that change answers -- not --batch-size, --batching or --mesh -- and a digest of each input line
answered): a rerun that would answer differently (another model, --method, --max-new-tokens, --quantize ..., or a
corrected input line among those answered) is refused, naming what differs, and so is an output without a record
(written before infer.py kept them); --overwrite starts afresh. Settings and files are checked before the model
loads: a bad setting, an output that is the input, cannot be written, is not this tool's, or holds another run's
answers exits 2 ("infer.py: error: ...") and leaves the output as it was.
"""

import argparse
import sys
import textwrap


def main(argv=None) -> int:
  from t5x_lite.mesh_spec import MESH_SPEC_HELP  # pylint: disable=import-outside-toplevel  (no JAX)
  title, _, *notes = __doc__.split("\n\n")  # --help: the title, argparse's usage, then the notes on lines and files
  notes.append(textwrap.fill(MESH_SPEC_HELP, 115, break_on_hyphens=False))
  p = argparse.ArgumentParser(description=title, epilog="\n\n".join(notes),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", required=True, help="HF model dir, t5x_lite checkpoint, or train.py workdir")
  p.add_argument("--input", required=True, help='JSONL, a line such as {"text": ...} (keys: see below)')
  p.add_argument("--output", required=True)
  p.add_argument("--mode", choices=["generate", "score"], default="generate")
  p.add_argument("--batch-size", type=int, default=8, help="rows decoded at once (in-flight: slots)")
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--max-input-length", type=int, default=2048, help="longer inputs get an error line")
  p.add_argument("--method", choices=["greedy", "sample", "beam"], default="greedy")
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--top-k", type=int, default=0)
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--num-beams", type=int, default=4)
  p.add_argument("--length-penalty", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--batching", choices=["inflight", "static"], default="inflight",
                 help="inflight: a finished line's slot takes the next line at once; static: fixed batches (beam "
                      "search always)")
  p.add_argument("--mesh", default=None, help="e.g. data:4,tensor:2 (batch over data, weights over fsdp/tensor; "
                 "the syntax below)")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--quantize", default=None, choices=["int8", "bfloat16"],
                 help="store the matmul weights so (weight-only; activations stay in --dtype), as load(quantize=)")
  p.add_argument("--tokenizer", default=None, help="directory holding spiece.model / tokenizer.model")
  p.add_argument("--overwrite", action="store_true",
                 help="answer every line afresh, discarding the answers an earlier run left in --output")
  from t5x_lite import multihost  # pylint: disable=import-outside-toplevel  (no JAX)
  multihost.add_flags(p, underscores=False)
  args = p.parse_args(argv)
  multihost.check_flags(p, args)
  # t5x_lite.inference imports numpy only (no JAX): the checks below run in a fraction of a second.
  from t5x_lite import inference, inference_record  # pylint: disable=import-outside-toplevel
  try:  # every run-wide setting, before the model loads: a bad one would otherwise fail each line in turn
    options = inference.InferenceOptions(
        mode=args.mode, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        max_input_length=args.max_input_length, method=args.method, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, num_beams=args.num_beams, length_penalty=args.length_penalty, seed=args.seed,
        batching=args.batching)
  except ValueError as e:
    p.error(str(e))  # exits 2
  try:  # and the files: the output must not be the input, be writable, and hold only answers this run would give
    run = inference_record.describe(args.model, args.tokenizer, options, args.dtype, args.input,
                                    quantize=args.quantize)
    inference.check_files(args.input, args.output, run, overwrite=args.overwrite)
  except (ValueError, OSError) as e:
    return _fail(p, e)

  from t5x_lite.xla_flags import set_cpu_defaults  # pylint: disable=import-outside-toplevel
  set_cpu_defaults()
  multihost.initialize(args, p.prog)  # a coordinator that does not answer in time: exit 2 naming its address
  import jax  # pylint: disable=import-outside-toplevel
  import t5x_lite  # pylint: disable=import-outside-toplevel
  from t5x_lite.models.registry import family_of_config  # pylint: disable=import-outside-toplevel
  from t5x_lite.tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel
  processes = jax.process_count()
  try:
    # Several processes: the model is sharded over all their devices (fsdp by default), each runs every batch.
    mesh_spec = args.mesh or (f"fsdp:{jax.device_count()}" if processes > 1 else None)
    mesh = t5x_lite.make_mesh(mesh_spec) if mesh_spec else None
    model = t5x_lite.load(args.model, dtype=args.dtype, mesh=mesh, quantize=args.quantize)
    if args.tokenizer:
      model.tokenizer = load_tokenizer(args.tokenizer, family_of_config(model.config).tokenizer)
      if model.tokenizer is None:
        raise ValueError(f"{args.tokenizer}: no tokenizer file (spiece.model / tokenizer.model) found")
    stats = inference.run_file(model, args.input, args.output, options, run=run, overwrite=args.overwrite,
                               writes=jax.process_index() == 0, agree=multihost.agree_on_first if processes > 1
                               else None)
  except (t5x_lite.ConversionError, ValueError, OSError) as e:
    return _fail(p, e)
  if jax.process_index():
    return 0
  errors = f"{stats['errors']} errors"
  resumed = ""
  if stats["resumed_at"]:
    errors += f", {stats['earlier_errors']} of them from the earlier run"
    resumed = f", resumed at line {stats['resumed_at']}"
  print(f"wrote {args.output}: {stats['lines']} lines ({errors}){resumed}", file=sys.stderr)
  return 0


def _fail(p: argparse.ArgumentParser, e: Exception) -> int:
  """A run-time refusal: argparse's "PROG: error: ..." form and exit status, without the usage text."""
  print(f"{p.prog}: error: {e}", file=sys.stderr)
  return 2


if __name__ == "__main__":
  from t5x_lite.malloc_tunables import reexec_with_malloc_tunables
  reexec_with_malloc_tunables()  # before anything else: it may replace this process (see the module)
  sys.exit(main())
