"""What a span-corruption / UL2 pretraining run learned, in a form a person reads: filling the blanks of held-out
text, against baselines that need no model.

Held-out documents are corrupted the way the mixture's first denoiser corrupts training text (UL2's R task: spans
of mean 3 tokens over 15% of a piece, with its [NLU] mode token; T5's span corruption), and the model's guess at
each masked token, reading the true tokens before it (teacher forcing, as the loss does), is compared with:
  - the unigram baseline: always the most frequent token of the training text;
  - the bigram baseline: the token that most often follows the previous one in the training text (the token
    before a span is the one before its sentinel in the input).
The same goes for continuing held-out text (the prefix-LM task). Sentinels and EOS are left out of every count: a
model gets them right by copying the input's order. The model's guess is its most likely token among those of the
training text, the tokens the baselines choose from: a text token comes at every scored position, and an argmax over
every id would also count its guesses that the blank or the text ends there, which the baselines never make (a short
run's model guesses an end at about half of the positions inside a blank). That stricter share is kept too, as
"accuracy_any_token". The first token of each blank (or continuation) is also counted apart: only the input tells
the decoder what precedes it, so it shows whether the model has learned to read the text around a blank. A few
held-out sentences with their blanks filled by greedy decoding go with the numbers.
"""

from collections import Counter, defaultdict

import numpy as np

from t5x_lite.data.pipeline import token_ids
from t5x_lite.data.ul2 import Mixture, ul2_examples
from t5x_lite.models.layers import shift_right


def _task_alone(mixture: Mixture, prefix_lm: bool) -> Mixture:
  """The mixture's first span-corruption task (prefix_lm=False) or its prefix-LM task alone, with the same budget
  and sentinels; None when the mixture has no such task."""
  task = next((d for d in mixture.denoisers if d.is_prefix_lm == prefix_lm), None)
  if task is None:
    return None
  return Mixture((task,), first_sentinel_id=mixture.first_sentinel_id, inputs_length=mixture.inputs_length,
                 targets_length=mixture.targets_length, num_sentinels=mixture.num_sentinels, eos_id=mixture.eos_id)


def _is_sentinel(ids: np.ndarray, mixture: Mixture) -> np.ndarray:
  return (ids <= mixture.first_sentinel_id) & (ids > mixture.first_sentinel_id - mixture.num_sentinels)


def _previous_tokens(inputs: np.ndarray, targets: np.ndarray, mixture: Mixture, mode_tokens: int) -> np.ndarray:
  """For each target token, the token before it in the original text: the previous target token inside a span or a
  continuation; for a span's first token, the input token before that span's sentinel, and for a continuation's
  first token, the prefix's last (-1 where there is none: the `mode_tokens` opening the inputs are not text)."""
  in_sentinel, target_sentinel = _is_sentinel(inputs, mixture), _is_sentinel(targets, mixture)
  before_sentinel = {int(inputs[k]): int(inputs[k - 1]) if k > mode_tokens and not in_sentinel[k - 1] else -1
                     for k in np.flatnonzero(in_sentinel)}
  previous = np.full(len(targets), -1)
  if not before_sentinel and len(inputs) - 1 > mode_tokens:  # a continuation; inputs end with EOS
    previous[0] = int(inputs[-2])
  for k in range(1, len(targets)):
    prev = int(targets[k - 1])
    previous[k] = before_sentinel.get(prev, -1) if target_sentinel[k - 1] else prev
  return previous


def _ngram_tables(tokenizer, texts, limit: int = 20_000) -> tuple[int, dict, np.ndarray]:
  """(the most frequent token, {token: the token that most often follows it}, the ids the texts hold, sorted)."""
  unigram, bigram = Counter(), defaultdict(Counter)
  for text in texts[:limit]:
    ids = token_ids(tokenizer, text)
    unigram.update(ids)
    for a, b in zip(ids, ids[1:]):
      bigram[a][b] += 1
  top = unigram.most_common(1)[0][0]
  return top, {a: c.most_common(1)[0][0] for a, c in bigram.items()}, np.array(sorted(unigram))


def span_report(model, mixture: Mixture, train_texts, held_out_texts, *, examples: int = 1024, samples: int = 4,
                seed: int = 0, batch_size: int = 64) -> dict:
  """{"spans": held-out span filling, "continuation": held-out continuation (the prefix-LM task, when the mixture
  has it)}, each {"tokens", "accuracy", "accuracy_any_token", "unigram_baseline", "bigram_baseline"}; "samples":
  [{"text": a held-out text with its blanks as [1], [2], ..., "model": [fills], "truth": [fills]}]."""
  top, follows, text_ids = _ngram_tables(model.tokenizer, train_texts)
  report = {"most_frequent_token": model.tokenizer.decode([top])}
  for name, prefix_lm in (("spans", False), ("continuation", True)):
    task = _task_alone(mixture, prefix_lm)
    if task is None:
      continue
    pieces = _examples(model.tokenizer, task, held_out_texts, examples, seed)
    rows = [ex for text_pieces in pieces for ex in text_pieces]
    report[name] = _accuracies(model, rows, mixture, len(task.denoisers[0].mode_ids), top, follows, text_ids,
                                batch_size)
    if not prefix_lm:  # samples that open their text read better than those starting inside a word
      report["samples"] = _samples(model, [text_pieces[0] for text_pieces in pieces], mixture, samples)
  return report


def _examples(tokenizer, task: Mixture, texts, limit: int, seed: int) -> list[list]:
  """Examples of `task` from `texts`, each text cut into consecutive pieces as training cuts them (pieces of fewer
  than 8 tokens left out): a list per text, up to `limit` examples in all."""
  pieces, count = [], 0
  for i, text in enumerate(texts):
    ids = token_ids(tokenizer, text)
    examples = [ex for ex in ul2_examples(ids, task, seed=(seed, i)) if ex.num_raw_tokens >= 8][:limit - count]
    if examples:
      pieces.append(examples)
      count += len(examples)
    if count == limit:
      break
  if not pieces:
    raise ValueError("no held-out text of 8 tokens or more to report on")
  return pieces


def _accuracies(model, rows, mixture: Mixture, mode_tokens: int, top: int, follows: dict, text_ids: np.ndarray,
                batch_size: int) -> dict:
  """Teacher-forced accuracy on the target tokens other than sentinels and EOS of the model's most likely token
  among `text_ids` (and of its argmax over every id), and the baselines'; "first_tokens": the same over the first
  token of each blank or continuation, the one that only the input says anything about."""
  pad = model.config.pad_token_id
  hits = {"accuracy": [], "accuracy_any_token": [], "unigram_baseline": [], "bigram_baseline": []}
  first = []
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    inputs, mask = _padded([r.inputs for r in chunk], pad)
    targets, target_mask = _padded([r.targets for r in chunk], pad)
    decoder_in = np.asarray(shift_right(targets, model.config.decoder_start_token_id, pad))
    logits = model.logits(inputs, mask, decoder_in, target_mask)
    predicted, predicted_any = text_ids[logits[..., text_ids].argmax(-1)], logits.argmax(-1)
    for row, r in enumerate(chunk):
      t = np.asarray(r.targets)
      sentinel = _is_sentinel(t, mixture)
      scored = ~sentinel & (t != mixture.eos_id)
      previous = _previous_tokens(np.asarray(r.inputs), t, mixture, mode_tokens)
      guesses = {"accuracy": predicted[row, :len(t)], "accuracy_any_token": predicted_any[row, :len(t)],
                 "unigram_baseline": np.full(len(t), top),
                 "bigram_baseline": np.array([follows.get(int(p), top) for p in previous])}
      for name, guess in guesses.items():
        hits[name].append((guess == t)[scored])
      first.append(np.concatenate([[True], sentinel[:-1]])[scored])  # after a sentinel, or opening the targets
  hits = {name: np.concatenate(h) for name, h in hits.items()}
  first = np.concatenate(first)

  def shares(where):
    return {"tokens": int(where.sum()), **{name: float(h[where].mean()) if where.any() else 0.0
                                           for name, h in hits.items()}}
  return {**shares(np.ones_like(first)), "first_tokens": shares(first)}


def _padded(seqs, pad: int) -> tuple[np.ndarray, np.ndarray]:
  width = max(len(s) for s in seqs)
  ids = np.full((len(seqs), width), pad, np.int32)
  mask = np.zeros((len(seqs), width), np.int32)
  for i, s in enumerate(seqs):
    ids[i, :len(s)], mask[i, :len(s)] = s, 1
  return ids, mask


def _split_at_sentinels(ids, mixture: Mixture) -> dict[int, list[int]]:
  """{sentinel id: the tokens after it, up to the next sentinel or EOS}."""
  ids = np.asarray(ids)
  out, current = {}, None
  for t, sentinel in zip(ids.tolist(), _is_sentinel(ids, mixture)):
    if t == mixture.eos_id:
      break
    if sentinel:
      current = out.setdefault(t, [])
    elif current is not None:
      current.append(t)
  return out


def _samples(model, rows, mixture: Mixture, n: int) -> list[dict]:
  """The first `n` held-out pieces of at most 48 tokens with two or three blanks, filled greedily. (T5's noise mask
  always ends a piece with a span, usually the closing "."; a second blank is one inside the text.)"""
  def readable(r):
    return len(r.inputs) <= 48 and 2 <= _is_sentinel(np.asarray(r.inputs), mixture).sum() <= 3

  chosen = [r for r in rows if readable(r)][:n]
  if not chosen:
    return []
  inputs, mask = _padded([r.inputs for r in chosen], model.config.pad_token_id)
  outputs = model.generate(inputs, mask, max_new_tokens=max(len(r.targets) for r in chosen) + 4)
  tok = model.tokenizer
  mode = len(next(d for d in mixture.denoisers if not d.is_prefix_lm).mode_ids)
  samples = []
  for r, out in zip(chosen, outputs):
    inputs = np.asarray(r.inputs)
    sentinels = inputs[_is_sentinel(inputs, mixture)].tolist()
    blank = {s: f"[{k + 1}]" for k, s in enumerate(sentinels)}
    parts, run = [], []
    for t in map(int, r.inputs[mode:]):
      if t in blank or t == mixture.eos_id:
        parts.append(tok.decode(run))
        run = []
        if t in blank:
          parts.append(blank[t])
      else:
        run.append(t)
    truth, fills = _split_at_sentinels(r.targets, mixture), _split_at_sentinels(out, mixture)
    samples.append({"text": " ".join(p for p in parts if p),
                    "model": [tok.decode(fills.get(s, [])) for s in sentinels],
                    "truth": [tok.decode(truth.get(s, [])) for s in sentinels]})
  return samples


def format_report(report: dict) -> str:
  """The report as the table and samples the demo prints."""
  rows = []
  for name, what, first in (("spans", "filling blanks", "the first token of a blank"),
                            ("continuation", "continuing text", "the first token after the input")):
    if name in report:
      rows += [(f"{what} ({report[name]['tokens']} tokens)", report[name]),
               (f"  {first} ({report[name]['first_tokens']['tokens']})", report[name]["first_tokens"])]
  lines = []
  if rows:
    columns = ("model", f"always {report.get('most_frequent_token', '')!r}",
               "the token most often after the previous one")
    width = max(len(label) for label, _ in rows)
    lines.append("held-out text, the share of tokens guessed right (each guess reads the true text before it):")
    lines.append(f"  {'':{width}}  " + "  ".join(columns))
    for label, r in rows:
      cells = (r["accuracy"], r["unigram_baseline"], r["bigram_baseline"])
      lines.append(f"  {label:{width}}  " + "  ".join(f"{c:>{min(len(h), 10)}.1%}".ljust(len(h))
                                                     for c, h in zip(cells, columns)).rstrip())
  for s in report.get("samples", []):
    lines.append(f"  {s['text']}")
    lines.append("      model: " + "  ".join(f"[{k + 1}] {f!r}" for k, f in enumerate(s["model"]))
                 + "   truth: " + "  ".join(f"[{k + 1}] {f!r}" for k, f in enumerate(s["truth"])))
  return "\n".join(lines)
