"""Batch inference over JSONL: every input line gets exactly one output line, in order, and a killed run
resumes where it stopped.

Input lines: {"text": ...} or {"input_ids": [...]}, plus "target" (text or ids) in score mode; train.py's seq2seq
spellings {"inputs": ..., "targets": ...} (each text or ids) work too; a line giving two spellings of one field is
an error line. Output lines: {"output": text, "output_ids": [...]} or {"score": float}, or {"error": "..."} for a
line that cannot be processed (a bad line never stops the run). Results are appended a batch at a time and flushed
to disk, so the output only ever holds complete lines; on restart the complete lines are kept, a torn last line is
cut off, and work continues with the next input line -- when OUT.jsonl.run says that the same run made them: the
same model files, tokenizer, answer-changing settings and input lines (inference_record.py); else the rerun is
refused, unless asked to start afresh.

Lines are split at "\\n" only (as `wc -l` counts them), never at the other characters str.splitlines breaks at
(U+2028, U+0085, form feed ...), which JSON text may hold: input line i is always output line i.
A run-wide mistake (a bad setting, an output file that is the input, not writable, not our output or another run's)
raises ValueError before anything is written: reported once per line instead, it would be kept by every resumed run.
"""

import contextlib
import dataclasses
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from t5x_lite import inference_record

# The keys of an output line, and how json.dumps begins each kind: a torn last line must begin like one of them.
OUTPUT_KEYS = ("output", "output_ids", "score", "error")
_LINE_STARTS = (b'{"output', b'{"score"', b'{"error"')
# Beam search divides by length ** length_penalty in float32 (exp(88.7) is its largest finite value) for every
# length up to the output bucket: the next power of two >= max_new_tokens, at least 16 (decoding/buckets.py, not
# imported here: its package pulls in JAX).
_FLOAT32_LOG_MAX = math.log(float(np.finfo(np.float32).max))


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value) -> bool:
  return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class InferenceOptions:
  """The run-wide settings; constructing one checks them (ValueError naming infer.py's flag)."""
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
  batching: str = "inflight"  # inflight | static (beam search always runs in static batches)

  @property
  def inflight(self) -> bool:
    """Whether generation runs through in-flight batching (t5x_lite/inflight.py)."""
    return self.mode == "generate" and self.batching == "inflight" and self.method != "beam"

  def __post_init__(self):
    # The ranges Model.generate checks (model.py, _check_generation_args), whatever the mode, plus what it would
    # crash on or silently mis-decode with (non-finite values, a length normaliser past float32, a seed that
    # overflows int64 once the batch offset is added).
    _require(self.mode in ("generate", "score"), f"--mode must be generate or score, got {self.mode!r}")
    _require(self.method in ("greedy", "sample", "beam"),
             f"--method must be greedy, sample or beam, got {self.method!r}")
    _require(self.batching in ("inflight", "static"), f"--batching must be inflight or static, got {self.batching!r}")
    for flag, value in (("--batch-size", self.batch_size), ("--max-new-tokens", self.max_new_tokens),
                        ("--max-input-length", self.max_input_length)):
      _require(_is_int(value) and value >= 1, f"{flag} must be an integer >= 1, got {value!r}")
    _require(_is_int(self.top_k) and self.top_k >= 0, f"--top-k must be an integer >= 0 (0: off), got {self.top_k!r}")
    _require(_is_real(self.top_p) and 0 < self.top_p <= 1, f"--top-p must be in (0, 1] (1: off), got {self.top_p!r}")
    if self.method == "sample":
      _require(_is_real(self.temperature) and 0 < self.temperature < math.inf,
               f"--temperature must be a finite number > 0 for --method sample, got {self.temperature!r}")
    if self.method == "beam":
      _require(_is_int(self.num_beams) and self.num_beams >= 1,
               f"--num-beams must be an integer >= 1 for --method beam, got {self.num_beams!r}")
      _require(_is_real(self.length_penalty) and math.isfinite(self.length_penalty),
               f"--length-penalty must be a finite number, got {self.length_penalty!r}")
      _require(abs(self.length_penalty) * math.log(max(16, 2 * self.max_new_tokens)) < _FLOAT32_LOG_MAX,
               f"--length-penalty {self.length_penalty} is too large for --max-new-tokens {self.max_new_tokens}: "
               "beam search's length ** penalty overflows float32")
    _require(_is_int(self.seed) and abs(self.seed) < 2 ** 62, f"--seed must be an integer below 2**62 in magnitude, "
             f"got {self.seed!r}")


class LineError(ValueError):
  """A problem with one input line: reported in its output line, never fatal."""


def read_lines(path: str) -> list[bytes]:
  """The lines of `path`, split at b"\\n" only; a last line without its newline counts, an empty tail does not."""
  with open(path, "rb") as f:
    lines = f.read().split(b"\n")
  if lines[-1] == b"":
    lines.pop()
  return lines


def _output_record(raw: bytes) -> tuple[dict | None, str]:
  """(the record, "") for a complete line this module writes (in either mode), else (None, what is wrong with it)."""
  try:
    record = json.loads(raw)
  except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
    return None, "is not JSON"
  if not isinstance(record, dict):
    return None, "is not a JSON object"
  if not any(k in record for k in OUTPUT_KEYS):
    return None, f"has none of the keys {', '.join(OUTPUT_KEYS)}"
  if not any(k in record for k in ("output_ids", "score", "error")):
    return None, 'has none of "output_ids", "score", "error"'
  return record, ""


def _not_ours(output_path: str, line: int, problem: str) -> ValueError:
  return ValueError(f"{output_path} line {line} {problem}: it does not look like infer.py output to resume (left "
                    "unchanged); remove it or give another --output")


def _check_writable(output_path: str) -> None:
  """ValueError unless the output (and its record) can be written: found now, not after the model has loaded."""
  folder = os.path.dirname(os.path.abspath(output_path))
  if not os.path.isdir(folder):
    raise ValueError(f"--output {output_path}: {folder} is not a folder" if os.path.exists(folder) else
                     f"--output {output_path}: the folder {folder} does not exist")
  try:  # a file made and removed: permission bits alone miss a read-only file system, and root's rights
    fd, probe = tempfile.mkstemp(dir=folder, prefix=".infer-write-check-")
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise ValueError(f"--output {output_path}: cannot create files in {folder} ({e.strerror})") from None
  for path in (output_path, inference_record.record_path(output_path)):
    try:
      if os.path.exists(path):
        open(path, "rb+").close()  # pylint: disable=consider-using-with
    except OSError as e:
      raise ValueError(f"--output {output_path}: cannot write {path} ({e.strerror})") from None


def _read_output(output_path: str) -> tuple[int, int]:
  """(complete lines, error lines among them) of an existing output; ValueError for a file not of this module
  (a torn last line that begins like one of ours is an interrupted write, cut off later by run_file)."""
  with open(output_path, "rb") as f:
    data = f.read()
  keep = data.rfind(b"\n") + 1
  done, errors = 0, 0
  for done, raw in enumerate(data[:keep].split(b"\n")[:-1], 1):
    record, problem = _output_record(raw)
    if record is None:
      raise _not_ours(output_path, done, problem)
    errors += "error" in record
  torn = data[keep:]
  if torn and not any(torn[:len(s)] == s[:len(torn)] for s in _LINE_STARTS):
    raise _not_ours(output_path, done + 1, "is cut off and does not begin like an output line")
  return done, errors


def _answers(n: int) -> str:
  return f"{n} answer{'s' * (n != 1)}"


def check_files(input_path: str, output_path: str, run: dict, *,
                overwrite: bool = False) -> tuple[list[bytes], int, int]:
  """(input lines, complete output lines to keep, error lines among them) for a run described by `run`
  (inference_record.describe). Only reads: ValueError when the output is the input, cannot be written, holds a
  line this module would not write, or holds answers `run` would not give (another model, setting or input line,
  or no record of them) unless `overwrite` (then none are kept). The files are left as they are."""
  if os.path.exists(output_path) and os.path.exists(input_path) and os.path.samefile(input_path, output_path):
    raise ValueError(f"--output {output_path} is the input file {input_path}: its lines would be taken for "
                     "finished answers; give another --output")
  lines = read_lines(input_path)
  _check_writable(output_path)
  record_file = inference_record.record_path(output_path)
  recorded = inference_record.read(record_file)  # first: a file there that is not ours is never overwritten
  done, errors = _read_output(output_path) if os.path.exists(output_path) else (0, 0)
  if overwrite or done == 0:
    return lines, 0, 0
  if done > len(lines):
    raise ValueError(f"{output_path} has {done} lines but {input_path} only {len(lines)}: not its output")
  if recorded is None:  # written before infer.py kept records, or by hand: what made these answers is unknown
    raise ValueError(f"{output_path} holds {_answers(done)} but no record of what produced them ({record_file}): "
                     "pass --overwrite to answer every line afresh, or give another --output (left unchanged)")
  old, digests = recorded
  changed = inference_record.differences(old, run, digests, lines, done)
  if changed:
    raise ValueError(f"{output_path} holds {_answers(done)} of another run ({'; '.join(changed)}): pass --overwrite "
                     "to answer every line afresh, or give another --output (left unchanged)")
  return lines, done, errors


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


def _type_name(value) -> str:
  """What a JSON value is, for messages: 'a string', 'a number', 'a list' ..."""
  if isinstance(value, bool):
    return "a boolean"
  names = {str: "a string", int: "a number", float: "a number", list: "a list", dict: "an object"}
  return names.get(type(value), "null")


def _shown(value) -> str:
  """A scalar as its JSON text (1.5, true, "5"), a container or a long string by its type."""
  text = json.dumps(value, ensure_ascii=False)
  return text if not isinstance(value, (list, dict)) and len(text) <= 20 else _type_name(value)


def _text_ids(text: str, name: str, tokenizer, vocab_size: int) -> list[int]:
  if not text.strip():
    raise LineError(f'empty input: "{name}" holds no text')
  if tokenizer is None:
    raise LineError(f'"{name}" is text but the model has no tokenizer; give ids or pass --tokenizer')
  ids = tokenizer.encode(text)
  # Checked here, per line, as _list_ids checks given ids: a tokenizer larger than the model's vocabulary (another
  # model's --tokenizer; sentinels past a resized embedding) would otherwise fail the whole batch in the model.
  for i, t in enumerate(ids):
    if not 0 <= t < vocab_size:
      piece = json.dumps(tokenizer.decode([t], skip_special_tokens=False), ensure_ascii=False)
      raise LineError(f'"{name}" gives id {t} ({piece}) at position {i}, outside the model\'s vocabulary '
                      f"[0, {vocab_size}): the tokenizer does not match the model")
  return ids


def _list_ids(value: list, name: str, vocab_size: int) -> list[int]:
  for i, t in enumerate(value):
    if not _is_int(t):
      raise LineError(f'"{name}" must be a list of integer ids, got {_shown(t)} at position {i}')
    if not 0 <= t < vocab_size:
      raise LineError(f'"{name}" holds id {t} at position {i}, outside the vocabulary [0, {vocab_size})')
  return list(value)


# The keys an input line may give its input and target under: infer.py's own names (API.md) and the names train.py's
# seq2seq records use, so a training file can be scored or answered as it is. What each key may hold (a string is
# text for the tokenizer; a list holds ids):
INPUT_KEYS = ("text", "input_ids", "inputs")
TARGET_KEYS = ("target", "targets")
_HOLDS = {"text": (str,), "input_ids": (list,), "inputs": (str, list), "target": (str, list), "targets": (str, list)}
_KIND = {str: "a string", list: "a list of integer ids"}


def _the_key(record: dict, keys: tuple[str, ...]) -> str | None:
  """The one key of `keys` that `record` has, None for none, LineError naming them when it has several."""
  present = [k for k in keys if k in record]
  if len(present) == 2:
    raise LineError(f'give either "{present[0]}" or "{present[1]}", not both')
  if len(present) > 2:
    raise LineError("give only one of " + ", ".join(f'"{k}"' for k in present))
  return present[0] if present else None


def _field_ids(record: dict, key: str, tokenizer, vocab_size: int) -> list[int]:
  """The ids `record[key]` gives: text through the tokenizer, or a list of ids, as `_HOLDS[key]` allows."""
  value, holds = record[key], _HOLDS[key]
  if isinstance(value, str) and str in holds:
    return _text_ids(value, key, tokenizer, vocab_size)
  if isinstance(value, list) and list in holds:
    return _list_ids(value, key, vocab_size)
  raise LineError(f'"{key}" must be {" or ".join(_KIND[t] for t in holds)}, got {_type_name(value)}')


# Generation settings a line may give for itself (generate mode); the flags give the rest. Beam search is run-wide.
LINE_SETTINGS = ("max_new_tokens", "method", "temperature", "top_k", "top_p", "seed")


class ParsedLine(NamedTuple):
  """One input line made ready for the model: its input ids, target ids (score mode), for a line with "images"
  their pixels (n, 3, height, width) as the model's processor makes them (n = images and their crops), and the
  generation settings it gives itself (LINE_SETTINGS)."""
  ids: list[int]
  target: list[int] | None
  pixels: np.ndarray | None = None
  settings: dict = {}


def _line_settings(record: dict, options: InferenceOptions) -> dict:
  """The LINE_SETTINGS `record` gives, checked as the flags are (LineError naming the key)."""
  given = {k: record[k] for k in LINE_SETTINGS if k in record}
  if given and options.mode != "generate":
    raise LineError(f'"{next(iter(given))}" is a generation setting, but --mode is {options.mode}')
  if given and options.method == "beam":
    raise LineError(f'"{next(iter(given))}" given, but --method beam takes its settings from the flags only')
  method = given.get("method", options.method)
  if method not in ("greedy", "sample"):
    raise LineError(f'"method" must be "greedy" or "sample" (beam search is run-wide: --method beam), got '
                    f"{_shown(method)}")
  checks = {"max_new_tokens": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
            "temperature": (lambda v: _is_real(v) and 0 < v < math.inf, "a finite number > 0"),
            "top_k": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: off)"),
            "top_p": (lambda v: _is_real(v) and 0 < v <= 1, "a number in (0, 1] (1: off)"),
            "seed": (lambda v: _is_int(v) and abs(v) < 2 ** 62, "an integer below 2**62 in magnitude")}
  for key, (ok, what) in checks.items():
    if key in given and not ok(given[key]):
      raise LineError(f'"{key}" must be {what}, got {_shown(given[key])}')
  return given


def parse_line(line: bytes | str, options: InferenceOptions, tokenizer, model,
               base_dir: str = ".") -> ParsedLine:
  """The ids (and pixels) of one JSONL line, or LineError saying what is wrong. "images" paths are relative to
  `base_dir` (the input file's folder)."""
  if isinstance(line, bytes):
    try:
      line = line.decode("utf-8")
    except UnicodeDecodeError as e:
      raise LineError(f"invalid UTF-8 at byte {e.start}") from None
  line = line.removeprefix("\ufeff")  # a byte-order mark, as some editors start a file with
  if not line.strip():
    raise LineError("empty line")
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise LineError(f"invalid JSON: {e.msg} at column {e.colno}") from None
  if not isinstance(record, dict):
    raise LineError(f"each line must be a JSON object, got {_type_name(record)}")
  vocab_size = model.config.vocab_size
  input_key = _the_key(record, INPUT_KEYS)
  target_key = _the_key(record, TARGET_KEYS)  # two spellings of the target are ambiguous in either mode
  if input_key is None:
    raise LineError('missing field: give "text" or "input_ids" (or "inputs", as train.py reads)')
  pixels = None
  if "images" in record:
    ids, pixels = _with_images(record, input_key, tokenizer, model, base_dir)
  else:
    ids = _field_ids(record, input_key, tokenizer, vocab_size)
  if not ids:
    raise LineError("empty input: no ids")
  if len(ids) > options.max_input_length:
    raise LineError(f"input has {len(ids)} tokens, over --max-input-length {options.max_input_length} "
                    "(not truncated)")
  settings = _line_settings(record, options)
  target = None
  if options.mode == "score":
    if target_key is None:
      raise LineError('missing field "target" (or "targets") in score mode')
    target = _field_ids(record, target_key, tokenizer, vocab_size)
    bos = getattr(tokenizer, "bos_id", None)
    if isinstance(record[target_key], str) and not model.config.is_encoder_decoder and target[:1] == [bos]:
      target = target[1:]  # the target continues the prompt: no second BOS
    if not target:
      raise LineError("empty target")
  return ParsedLine(ids, target, pixels, settings)


def _with_images(record: dict, input_key: str, tokenizer, model, base_dir: str) -> tuple[list[int], np.ndarray]:
  """Ids and pixels of a line with "images": text goes through the processor (each `<start_of_image>` expands as
  transformers expands it); ids must already hold the image tokens. LineError names an image file that is
  missing, unreadable or not an image, and a count that does not match."""
  processor = model.processor
  if processor is None or processor.image_processor is None:
    raise LineError('"images" given, but this model reads no images (no vision tower, or no image processor '
                    "files in its directory)")
  images = record["images"]
  if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
    raise LineError(f'"images" must be a list of file paths, got {_shown(images)}')
  paths = [os.path.join(base_dir, p) for p in images]
  value = record[input_key]
  try:
    if isinstance(value, str):
      ids, pixels = processor.encode_example(value, paths)
      return [int(i) for i in ids], pixels
    ids = _field_ids(record, input_key, tokenizer, model.config.vocab_size)
    pixels, _ = processor.image_files(paths)
  except ValueError as e:  # ImageError naming a file, or the count of <start_of_image> and of the files
    raise LineError(str(e)) from None
  want = len(pixels) * processor.image_seq_length
  have = ids.count(processor.image_token_id)
  if have != want:
    raise LineError(f"input_ids hold {have} image tokens (id {processor.image_token_id}), but the {len(paths)} "
                    f"images need {want}")
  return ids, pixels


def _left_or_right_pad(rows: list[list[int]], pad: int, left: bool) -> tuple[np.ndarray, np.ndarray]:
  width = max(len(r) for r in rows)
  ids = np.full((len(rows), width), pad, np.int32)
  mask = np.zeros((len(rows), width), np.int32)
  for i, r in enumerate(rows):
    cols = slice(width - len(r), width) if left else slice(0, len(r))
    ids[i, cols], mask[i, cols] = r, 1
  return ids, mask


def _generated(model, row: np.ndarray) -> dict:
  """The output record of one row of new tokens: cut after its first EOS, with the text when there is a tokenizer."""
  eos = np.flatnonzero(row == model.config.eos_token_id)
  row = row[:eos[0] + 1] if eos.size else row
  record = {"output_ids": [int(t) for t in row]}
  if model.tokenizer is not None:
    record = {"output": model.tokenizer.decode(record["output_ids"], skip_special_tokens=True), **record}
  return record


def _settings(parsed: ParsedLine, options: InferenceOptions) -> dict:
  """A line's generation settings: its own (LINE_SETTINGS), the flags for the rest."""
  flags = {"max_new_tokens": options.max_new_tokens, "method": options.method, "temperature": options.temperature,
           "top_k": options.top_k, "top_p": options.top_p}
  return {**flags, **parsed.settings}


def run_batch(model, parsed: list[ParsedLine], options: InferenceOptions, seed: int) -> list[dict]:
  """Results for a batch of parsed lines, in order (static batching). Lines that give themselves other generation
  settings run as their own sub-batches; a line's "seed" replaces `seed` for its sub-batch."""
  config = model.config
  if options.mode == "score":
    ids, mask = _left_or_right_pad([p.ids for p in parsed], config.pad_token_id, left=not config.is_encoder_decoder)
    targets, _ = _left_or_right_pad([p.target for p in parsed], config.pad_token_id, left=False)
    return [{"score": float(s)} for s in model.score(ids, targets, mask, pixel_values=_pixels(parsed))]
  groups: dict[str, list[int]] = {}
  for k, p in enumerate(parsed):
    groups.setdefault(json.dumps(_settings(p, options), sort_keys=True), []).append(k)
  results: list[dict] = [{}] * len(parsed)
  for members in groups.values():
    group = [parsed[k] for k in members]
    settings = _settings(group[0], options)
    ids, mask = _left_or_right_pad([p.ids for p in group], config.pad_token_id, left=not config.is_encoder_decoder)
    out = model.generate(ids, mask, _pixels(group), max_new_tokens=settings["max_new_tokens"],
                         method=settings["method"], temperature=settings["temperature"], top_k=settings["top_k"],
                         top_p=settings["top_p"], num_beams=options.num_beams, length_penalty=options.length_penalty,
                         seed=settings.get("seed", seed))
    for k, row in zip(members, out):
      results[k] = _generated(model, row)
  return results


def _pixels(parsed: list[ParsedLine]) -> np.ndarray | None:
  """The lines' images in transformers' flat layout (row after row), None when no line has any."""
  with_images = [p.pixels for p in parsed if p.pixels is not None and len(p.pixels)]
  return np.concatenate(with_images) if with_images else None


def _chunks(lines: list[bytes], start: int, size: int) -> Iterator[tuple[int, list[bytes]]]:
  for i in range(start, len(lines), size):
    yield i, lines[i:i + size]


def _open_run(output_path: str, run: dict, done: int):
  """The output and its record opened for appending: afresh (done == 0: the output emptied first, so a kill in
  between leaves no answers under a record that did not make them) or after the `done` answers kept."""
  record_file = inference_record.record_path(output_path)
  if done == 0:
    open(output_path, "wb").close()  # pylint: disable=consider-using-with
    inference_record.write_new(record_file, run)
  else:
    if complete_lines(output_path) != done:  # cuts a torn last line; a count that moved means another writer
      raise ValueError(f"{output_path} changed while this run started: is another infer.py writing it?")
    inference_record.keep_digests(record_file, done)
  return open(output_path, "a", encoding="utf-8"), open(record_file, "ab")  # pylint: disable=consider-using-with


def run_file(model, input_path: str, output_path: str, options: InferenceOptions, *, run: dict,
             overwrite: bool = False, progress: bool = True, writes: bool = True,
             agree: Callable[[int], int] | None = None) -> dict:
  """Answers every line of `input_path` into `output_path`, resuming after its complete lines when `run`
  (inference_record.describe) is what made them (check_files), afresh with `overwrite`.

  Several processes sharing a sharded model (multi-host infer.py) all run this, batch for batch: only the one with
  `writes` touches the output and its record; `agree(answers kept)` returns the count every process resumes
  after (process 0's), and, being a collective, holds the writer back until every process has read the output.

  Returns {"lines", "resumed_at", "errors" (all error lines in the file), "earlier_errors" (those of them kept
  from the earlier run)}.
  """
  if model.config.task != "lm":  # every batch would fail: refuse once rather than write an error per line
    raise ValueError(f"{options.mode} needs a language-model head; this model's task is {model.config.task!r}")
  lines, done, earlier_errors = check_files(input_path, output_path, run, overwrite=overwrite)
  if agree is not None:
    done = agree(done)
  stats = {"lines": len(lines), "resumed_at": done, "errors": earlier_errors, "earlier_errors": earlier_errors}
  out, record = _open_run(output_path, run, done) if writes else (contextlib.nullcontext(),) * 2
  bar = tqdm(total=len(lines), initial=done, desc="infer", unit="line", disable=not progress or not writes,
             file=sys.stderr)
  base_dir = os.path.dirname(os.path.abspath(input_path))
  answers = (_inflight_answers(model, lines, done, options, stats, base_dir) if options.inflight else
             _static_answers(model, lines, done, options, stats, base_dir))
  with out, record, bar:  # the bar closes on an error too (own line for it)
    for start, results in answers:
      if writes:
        inference_record.append_digests(record, lines[start:start + len(results)])  # first: it covers every answer
        out.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results))
        out.flush()
        os.fsync(out.fileno())
      bar.update(len(results))
  return stats


def _pixel_loader(line: bytes, options: InferenceOptions, model, base_dir: str):
  return lambda: parse_line(line, options, model.tokenizer, model, base_dir).pixels


def _static_answers(model, lines: list[bytes], done: int, options: InferenceOptions, stats: dict,
                    base_dir: str) -> Iterator[tuple[int, list[dict]]]:
  """(first line, the results of the lines from there), a batch of --batch-size lines at a time."""
  for start, chunk in _chunks(lines, done, options.batch_size):
    yield start, _answer(model, chunk, options, options.seed + start, stats, base_dir)


def _inflight_answers(model, lines: list[bytes], done: int, options: InferenceOptions, stats: dict,
                      base_dir: str) -> Iterator[tuple[int, list[dict]]]:
  """(first line, the results of the lines from there) as in-flight batching (--batch-size slots) finishes them:
  each time the lines up to a finished one are all answered, so the output stays in input order.

  Every line is parsed first (the slots' sizes follow the longest input and output); an image line's pixels are
  dropped after its check and read again when it enters a slot, so a long file holds only the slots' images.
  Sampling lines draw with their own "seed", else with --seed and their line number, so a resumed run draws alike.
  """
  from t5x_lite import inflight  # pylint: disable=import-outside-toplevel  (JAX: not before the checks)
  results: dict[int, dict] = {}
  requests, line_of = [], []
  for n in range(done, len(lines)):
    try:
      parsed = parse_line(lines[n], options, model.tokenizer, model, base_dir)
    except LineError as e:
      results[n] = {"error": str(e)}
      stats["errors"] += 1
      continue
    settings = _settings(parsed, options)
    seed, stream = (settings["seed"], 0) if "seed" in settings else (options.seed, n + 1)
    pixels = None if parsed.pixels is None else _pixel_loader(lines[n], options, model, base_dir)
    requests.append(inflight.Request(parsed.ids, settings["max_new_tokens"], settings["method"],
                                     settings["temperature"], settings["top_k"], settings["top_p"], seed, stream,
                                     pixels))
    line_of.append(n)
  next_line = done

  def ready():
    nonlocal next_line
    start, out = next_line, []
    while next_line in results:
      out.append(results.pop(next_line))
      next_line += 1
    return start, out

  start, out = ready()
  if out:
    yield start, out
  for j, tokens in inflight.generate(model, requests, slots=options.batch_size):
    if isinstance(tokens, ValueError):  # its images changed since they were checked
      results[line_of[j]] = {"error": str(tokens)}
      stats["errors"] += 1
    else:
      results[line_of[j]] = _generated(model, tokens)
    start, out = ready()
    if out:
      yield start, out


def _answer(model, chunk: list[bytes], options: InferenceOptions, seed: int, stats: dict,
            base_dir: str) -> list[dict]:
  """The output records of a chunk of input lines, in order; error lines counted in `stats`."""
  results: list[dict | None] = [None] * len(chunk)
  good = []
  for k, line in enumerate(chunk):
    try:
      good.append((k, parse_line(line, options, model.tokenizer, model, base_dir)))
    except LineError as e:
      results[k] = {"error": str(e)}
      stats["errors"] += 1
  if good:
    try:
      for (k, _), result in zip(good, run_batch(model, [g for _, g in good], options, seed)):
        results[k] = result
    except ValueError as e:  # a batch the model rejects: report it on each of its lines, keep going
      for k, _ in good:
        results[k] = {"error": f"batch failed: {e}"}
        stats["errors"] += 1
  return results
