"""A whole run as train.py starts it: corpus and tokenizer, training, then generation from the checkpoint."""

import io
import json
import math
import os
import sys
import tempfile
from collections import Counter

import gin
import jax
import numpy as np
import sentencepiece as spm

from t5x_lite.convert.hf import tokenizer_files
from t5x_lite.data import pipeline, sources
from t5x_lite.data.stdlib_corpus import split_train_eval, stdlib_docstrings
from t5x_lite.tokenizer import load_tokenizer
from t5x_lite.training.loop import train

# The data config is a plain dataclass of the data package (which knows nothing of gin); bind it here.
_BoundDataConfig = gin.external_configurable(pipeline.DataConfig, "DataConfig")


def _train_sentencepiece(texts: list[str], vocab_size: int, seed: int) -> bytes:
  """A T5-layout unigram model (<pad>=0, </s>=1, <unk>=2, no BOS) trained on `texts`, serialised."""
  rng = np.random.default_rng(seed)
  sample = [texts[i] for i in rng.permutation(len(texts))[:20_000]]
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(sample), model_writer=model, vocab_size=vocab_size,
                                 model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1,
                                 character_coverage=0.9995, minloglevel=2)
  return model.getvalue()


def _stdlib_tokenizer_files(workdir: str, texts: list[str], vocab_size: int, seed: int) -> dict[str, bytes]:
  """The demo's spiece.model: the workdir's own (a resumed run reuses it), else trained on `texts` by process 0
  and sent to the others. Nothing is written here: the run writes it once the workdir accepted it (workdir.py)."""
  held = tokenizer_files(workdir)
  if "spiece.model" in held:
    return {"spiece.model": held["spiece.model"]}
  model = _train_sentencepiece(texts, vocab_size, seed) if jax.process_index() == 0 else b""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    size = int(multihost_utils.broadcast_one_to_all(np.int32(len(model))))
    buffer = np.frombuffer(model, np.uint8) if model else np.zeros(size, np.uint8)
    model = np.asarray(multihost_utils.broadcast_one_to_all(buffer), np.uint8).tobytes()
  return {"spiece.model": model}


def _tokenizer_from_files(files: dict[str, bytes], family: str):
  """load_tokenizer over `files` (name -> bytes) kept in a temporary directory."""
  with tempfile.TemporaryDirectory() as directory:
    for name, content in files.items():
      with open(os.path.join(directory, name), "wb") as f:
        f.write(content)
    return load_tokenizer(directory, family)


def unigram_entropy(tokenizer, texts: list[str]) -> float:
  """Entropy in nats of the corpus' token frequencies (what a model ignoring context would score)."""
  counts = Counter()
  for t in texts:
    counts.update(tokenizer.encode(t))
  total = sum(counts.values())
  return -sum(c / total * math.log(c / total) for c in counts.values())


@gin.configurable(denylist=["workdir"])
def run(workdir: str, *, corpus: str = "stdlib", files: tuple[str, ...] | str = (), tokenizer_dir: str | None = None,
        tokenizer_family: str = "t5", spm_vocab_size: int = 2000, max_documents: int | None = None,
        sample_prompts: tuple[str, ...] = (), sample_max_new_tokens: int = 24, report_spans: bool = False,
        seed: int = 0) -> dict:
  """corpus "stdlib": the installed standard library's docstrings with a sentencepiece model trained on them
  (kept in WORKDIR so a resumed run reuses it); "files": `files` (text/JSONL) with the tokenizer in
  `tokenizer_dir` (`tokenizer_family` "t5" reads spiece.model, "gemma" tokenizer.model; its image processor
  files, where it has them, read the images of image+text records: DataConfig.max_images). After training, the
  latest checkpoint is loaded and greedy-decodes `sample_prompts`; `report_spans` (a span-corruption / UL2 run of
  an encoder-decoder on a text corpus) prints what it learned: held-out span filling against n-gram baselines, with
  filled samples (span_report.py), also written to WORKDIR/span_report.json.

  Plain-text corpora hold out ~2% of their lines (by content hash) as the eval split that `train.eval_every`
  reads; JSONL records are all trained on (no eval split). A rerun on documents other than the first run's
  (compared by a fingerprint kept in WORKDIR/corpus_fingerprint.json) warns: the data iterator resumes by
  position, so it would go on over the new corpus from the old one's place. Nothing is written into the workdir
  before `train` has accepted it (workdir.py): a refused run leaves it as it was.
  """
  processor = None
  if corpus == "stdlib":
    train_docs, eval_docs = split_train_eval(stdlib_docstrings(max_documents))
    tokenizer_bytes = _stdlib_tokenizer_files(workdir, train_docs, spm_vocab_size, seed)
    tokenizer = _tokenizer_from_files(tokenizer_bytes, "t5")
  elif corpus == "files":
    if not files:
      raise ValueError("corpus 'files' needs run.files: the text / JSONL files (or glob patterns) to train on "
                       "(train.py builds the corpus from run.files; DataConfig.files is not read then)")
    docs = sources.read_documents(files)
    if not docs:
      raise ValueError(f"no documents in {list(files)}: the files hold only blank lines")
    train_docs, eval_docs = split_train_eval(docs) if docs and isinstance(docs[0], str) else (docs, [])
    tokenizer = load_tokenizer(tokenizer_dir, tokenizer_family) if tokenizer_dir else None
    if tokenizer is None:
      raise ValueError(f"corpus 'files' needs tokenizer_dir holding spiece.model / tokenizer.model "
                       f"(got {tokenizer_dir!r})")
    tokenizer_bytes = tokenizer_files(tokenizer_dir)  # the image processor's files too, where it has them
    from t5x_lite.vision.processor import load_processor  # pylint: disable=import-outside-toplevel
    processor = load_processor(tokenizer_dir, tokenizer=tokenizer)
  else:
    raise ValueError(f"corpus must be 'stdlib' or 'files', got {corpus!r}")

  metrics = train(workdir, tokenizer=tokenizer, tokenizer_files=tokenizer_bytes, documents=train_docs,
                  eval_documents=eval_docs, processor=processor)
  if metrics.get("preempted"):
    return metrics  # saved; the next start resumes
  stats_path = os.path.join(workdir, "corpus_stats.json")
  if corpus == "stdlib" and jax.process_index() == 0:
    if not os.path.exists(stats_path):  # computed once per workdir, after the run was accepted
      with open(stats_path, "w") as f:
        json.dump({"train_documents": len(train_docs), "eval_documents": len(eval_docs),
                   "unigram_entropy_nats": unigram_entropy(tokenizer, train_docs),
                   "vocab_size": tokenizer.vocab_size}, f, indent=2)
    if "loss" in metrics:
      with open(stats_path) as f:
        print(f"corpus unigram entropy {json.load(f)['unigram_entropy_nats']:.3f} nats/token; "
              f"final train loss {metrics['loss']:.3f}", file=sys.stderr)
  if (report_spans or sample_prompts) and jax.process_count() > 1:
    # Loading the checkpoint is a collective of every process (orbax); one host alone would wait for the others
    # until the coordinator's shutdown barrier kills the run.
    if jax.process_index() == 0:
      print(f"{workdir}: no span report or samples after a multi-process run; the trained model loads in one "
            f"process: t5x_lite.load({workdir!r}) or infer.py --model {workdir}", file=sys.stderr)
    return metrics
  if report_spans:
    write_span_report(workdir, tokenizer, train_docs, eval_docs)
  if sample_prompts:
    samples = generate_samples(workdir, sample_prompts, sample_max_new_tokens)
    for s in samples:
      print(f"  {s['prompt']!r} -> {s['output']!r}")
  return metrics


def generate_samples(workdir: str, prompts, max_new_tokens: int) -> list[dict]:
  """Greedy continuations from the run's latest checkpoint, also written to WORKDIR/samples.jsonl."""
  from t5x_lite.model import load  # pylint: disable=import-outside-toplevel
  model = load(workdir, progress=False)
  ids = [model.tokenizer.encode(p) for p in prompts]
  width = max(map(len, ids))
  batch = np.full((len(ids), width), model.config.pad_token_id, np.int32)
  mask = np.zeros_like(batch)
  for i, row in enumerate(ids):
    # An encoder reads padded rows from the left; a decoder-only prompt must end where generation begins.
    cols = slice(0, len(row)) if model.config.is_encoder_decoder else slice(width - len(row), width)
    batch[i, cols], mask[i, cols] = row, 1
  out = model.generate(batch, mask, max_new_tokens=max_new_tokens)
  samples = [{"prompt": p, "output": model.tokenizer.decode(row.tolist(), skip_special_tokens=False)
              .replace("<pad>", "").strip()} for p, row in zip(prompts, out)]
  with open(os.path.join(workdir, "samples.jsonl"), "w") as f:
    f.writelines(json.dumps(s) + "\n" for s in samples)
  return samples


def write_span_report(workdir: str, tokenizer, train_texts, held_out_texts) -> dict:
  """span_report.py on the run's latest checkpoint and its held-out texts, printed and kept in the workdir."""
  from t5x_lite.model import load  # pylint: disable=import-outside-toplevel
  from t5x_lite.training import span_report  # pylint: disable=import-outside-toplevel
  model = load(workdir, progress=False)
  mixture = pipeline.make_mixture(_BoundDataConfig(), tokenizer)
  try:
    report = span_report.span_report(model, mixture, train_texts, held_out_texts)
  except ValueError as e:  # a corpus too small to hold text out (JSONL records have no eval split)
    print(f"no span-filling report: {e}", file=sys.stderr)
    return {}
  with open(os.path.join(workdir, "span_report.json"), "w") as f:
    json.dump(report, f, indent=2)
  print(span_report.format_report(report), file=sys.stderr)
  return report
