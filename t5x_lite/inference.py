"""Batch inference over JSONL: every input line gets exactly one output line, in order, and a killed run
resumes where it stopped.

Input lines: {"text": ...} or {"input_ids": [...]}, plus "target" (text or ids) in score mode. Output lines:
{"output": text, "output_ids": [...]} or {"score": float}, or {"error": "..."} for a line that cannot be
processed (a bad line never stops the run). Results are appended a batch at a time and flushed to disk, so
the output only ever holds complete lines; on restart the complete lines are kept, a torn last line is cut
off, and work continues with the next input line.
"""

import dataclasses
import json
import os
import sys
from collections.abc import Iterator

import numpy as np
from tqdm import tqdm


@dataclasses.dataclass(frozen=True)
class InferenceOptions:
  mode: str = "generate"  # generate | score
  batch_size: int = 8
  max_new_tokens: int = 64
  max_input_length: int = 2048
  method: str = "greedy"
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  num_beams: int = 4
  length_penalty: float = 1.0
  seed: int = 0


class LineError(ValueError):
  """A problem with one input line: reported in its output line, never fatal."""


def complete_lines(path: str) -> int:
  """Number of complete (newline-terminated) lines in `path`, cutting off a torn last line in place."""
  if not os.path.exists(path):
    return 0
  with open(path, "rb+") as f:
    data = f.read()
    keep = data.rfind(b"\n") + 1
    if keep != len(data):
      f.truncate(keep)
  return data[:keep].count(b"\n")


def _ids_field(value, name: str, tokenizer, model) -> list[int]:
  if isinstance(value, str):
    if not value.strip():
      raise LineError(f'empty input: "{name}" holds no text')
    if tokenizer is None:
      raise LineError(f'"{name}" is text but the model has no tokenizer; give ids or pass --tokenizer')
    return tokenizer.encode(value)
  if isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value):
    bad = [i for i in value if not 0 <= i < model.config.vocab_size]
    if bad:
      raise LineError(f'"{name}" holds id {bad[0]}, outside the vocabulary [0, {model.config.vocab_size})')
    return list(value)
  raise LineError(f'"{name}" must be a string or a list of integer ids')


def parse_line(line: str, options: InferenceOptions, tokenizer, model) -> tuple[list[int], list[int] | None]:
  """(input ids, target ids or None) for one JSONL line, or LineError saying what is wrong."""
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise LineError(f"invalid JSON: {e.msg} at column {e.colno}") from None
  if not isinstance(record, dict):
    raise LineError("each line must be a JSON object")
  if "text" in record:
    if not isinstance(record["text"], str):
      raise LineError('"text" must be a string')
    ids = _ids_field(record["text"], "text", tokenizer, model)
  elif "input_ids" in record:
    if not isinstance(record["input_ids"], list):
      raise LineError('"input_ids" must be a list of integer ids')
    ids = _ids_field(record["input_ids"], "input_ids", tokenizer, model)
  else:
    raise LineError('missing field: give "text" or "input_ids"')
  if not ids:
    raise LineError("empty input: no ids")
  if len(ids) > options.max_input_length:
    raise LineError(f"input has {len(ids)} tokens, over --max-input-length {options.max_input_length} "
                    "(not truncated)")
  target = None
  if options.mode == "score":
    if "target" not in record:
      raise LineError('missing field "target" (score mode)')
    target = _ids_field(record["target"], "target", tokenizer, model)
    bos = getattr(tokenizer, "bos_id", None)
    if isinstance(record["target"], str) and not model.config.is_encoder_decoder and target[:1] == [bos]:
      target = target[1:]  # the target continues the prompt: no second BOS
    if not target:
      raise LineError("empty target")
  return ids, target


def _left_or_right_pad(rows: list[list[int]], pad: int, left: bool) -> tuple[np.ndarray, np.ndarray]:
  width = max(len(r) for r in rows)
  ids = np.full((len(rows), width), pad, np.int32)
  mask = np.zeros((len(rows), width), np.int32)
  for i, r in enumerate(rows):
    cols = slice(width - len(r), width) if left else slice(0, len(r))
    ids[i, cols], mask[i, cols] = r, 1
  return ids, mask


def run_batch(model, parsed: list[tuple[list[int], list[int] | None]], options: InferenceOptions,
              seed: int) -> list[dict]:
  """Results for a batch of parsed lines, in order."""
  config = model.config
  ids, mask = _left_or_right_pad([p[0] for p in parsed], config.pad_token_id, left=not config.is_encoder_decoder)
  if options.mode == "score":
    targets, _ = _left_or_right_pad([p[1] for p in parsed], config.pad_token_id, left=False)
    return [{"score": float(s)} for s in model.score(ids, targets, mask)]
  out = model.generate(ids, mask, max_new_tokens=options.max_new_tokens, method=options.method,
                       temperature=options.temperature, top_k=options.top_k, top_p=options.top_p,
                       num_beams=options.num_beams, length_penalty=options.length_penalty, seed=seed)
  results = []
  for row in out:
    eos = np.flatnonzero(row == config.eos_token_id)
    row = row[:eos[0] + 1] if eos.size else row
    record = {"output_ids": [int(t) for t in row]}
    if model.tokenizer is not None:
      record = {"output": model.tokenizer.decode(record["output_ids"], skip_special_tokens=True), **record}
    results.append(record)
  return results


def _chunks(lines: list[str], start: int, size: int) -> Iterator[tuple[int, list[str]]]:
  for i in range(start, len(lines), size):
    yield i, lines[i:i + size]


def run_file(model, input_path: str, output_path: str, options: InferenceOptions, *, progress: bool = True) -> dict:
  """Answers every line of `input_path` into `output_path`, resuming after its complete lines."""
  with open(input_path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  done = complete_lines(output_path)
  if done > len(lines):
    raise ValueError(f"{output_path} has {done} lines but {input_path} only {len(lines)}: not its output")
  stats = {"lines": len(lines), "resumed_at": done, "errors": 0}
  bar = tqdm(total=len(lines), initial=done, desc="infer", unit="line", disable=not progress, file=sys.stderr)
  with open(output_path, "a", encoding="utf-8") as out:
    for start, chunk in _chunks(lines, done, options.batch_size):
      results: list[dict | None] = [None] * len(chunk)
      good = []
      for k, line in enumerate(chunk):
        try:
          good.append((k, parse_line(line, options, model.tokenizer, model)))
        except LineError as e:
          results[k] = {"error": str(e)}
          stats["errors"] += 1
      if good:
        try:
          for (k, _), result in zip(good, run_batch(model, [g for _, g in good], options, options.seed + start)):
            results[k] = result
        except ValueError as e:  # a batch the model rejects: report it on each of its lines, keep going
          for k, _ in good:
            results[k] = {"error": f"batch failed: {e}"}
            stats["errors"] += 1
      out.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results))
      out.flush()
      os.fsync(out.fileno())
      bar.update(len(chunk))
  bar.close()
  return stats
