"""What produced an infer.py output, recorded beside it, so that a rerun resumes only the same run.

The record is OUT.jsonl.run (`record_path`). Its first line is a JSON object: the model (resolved path, the
latest checkpoint step of a train.py workdir, and the size and modification time of each file loading reads), the
--tokenizer override (likewise), and every setting that changes answers. Not --batch-size, --batching or --mesh:
they change no greedy or beam answer beyond float rounding, and a smaller batch is the usual fix for a run that ran
out of memory (with --batching static and --method sample a line's draws depend on its batch, but every answer is
still a sample of the settings recorded; in-flight draws depend on the line alone). Each further line is the digest of one input line, appended (and fsync'd) before that line's answer is
written, so the record always covers every answer in the output and a corrected input line among them is found on
resume.

Sizes and modification times, not content hashes: fingerprinting a multi-GB checkpoint must not cost a read of it
before every rerun; a file rewritten in place with the same size keeps its size but not its modification time.
A model found under another path with the same files (moved, or copied with its times) counts as the same model.
Standard library only: infer.py checks all this before JAX is imported.
"""

import hashlib
import json
import os

FORMAT = 1
_WRITTEN_BY = "infer.py"
# The files of a model directory that t5x_lite.load (and its tokenizer) read, besides *.safetensors[.index.json],
# the params/ of a t5x_lite checkpoint and the latest checkpoints/STEP/ of a train.py workdir.
_MODEL_FILES = ("config.json", "spiece.model", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                "tokenizer.json")
_DIGEST_CHARS = 16  # 64 bits of BLAKE2b per input line: a chance edit goes unnoticed with odds 2**-64
_DIGEST_LINE = _DIGEST_CHARS + 1


def record_path(output_path: str) -> str:
  return output_path + ".run"


def line_digest(raw: bytes) -> str:
  return hashlib.blake2b(raw, digest_size=_DIGEST_CHARS // 2).hexdigest()


def _stat(path: str) -> list[int]:
  st = os.stat(path)
  return [st.st_size, st.st_mtime_ns]


def _latest_step(workdir: str) -> int | None:
  """The newest finished checkpoint of a train.py workdir: orbax writes STEP.orbax-checkpoint-tmp-* and renames it
  to STEP once complete, so the names that are all digits are the finished ones."""
  try:
    steps = [int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit()]
  except OSError:
    return None
  return max(steps, default=None)


def _tree(root: str, sub: str, files: dict) -> None:
  for folder, _, names in os.walk(os.path.join(root, sub)):
    for name in names:
      path = os.path.join(folder, name)
      files[os.path.relpath(path, root)] = _stat(path)


def _source(path: str) -> dict:
  """Where a model (or tokenizer) directory is and what identifies its files, without reading them."""
  files = {}
  step = _latest_step(path)
  if os.path.isdir(path):
    for name in sorted(os.listdir(path)):
      if name in _MODEL_FILES or name.endswith((".safetensors", ".safetensors.index.json")):
        files[name] = _stat(os.path.join(path, name))
    _tree(path, "params", files)
    if step is not None:
      _tree(path, os.path.join("checkpoints", str(step)), files)
  return {"path": os.path.realpath(path), "step": step, "files": files}


def answer_settings(options, dtype: str, quantize: str | None = None) -> dict:
  """infer.py's flags that change answers, with their values: those the mode and method use, nothing else (a
  --temperature given to greedy decoding changes nothing, so resuming with another one is no mismatch)."""
  settings = {"--mode": options.mode, "--max-input-length": options.max_input_length, "--dtype": dtype,
              "--quantize": quantize or "none"}
  if options.mode == "generate":
    settings.update({"--method": options.method, "--max-new-tokens": options.max_new_tokens})
    if options.method == "sample":
      settings.update({"--temperature": options.temperature, "--top-k": options.top_k, "--top-p": options.top_p,
                       "--seed": options.seed})
    if options.method == "beam":
      settings.update({"--num-beams": options.num_beams, "--length-penalty": options.length_penalty})
  return settings


def describe(model_path: str, tokenizer_path: str | None, options, dtype: str, input_path: str, *,
             quantize: str | None = None) -> dict:
  """The record of a run (its first line in OUT.jsonl.run). `input_path` is kept for people reading it only:
  what is compared is the digests of the input lines answered."""
  return {"written_by": _WRITTEN_BY, "format": FORMAT, "settings": answer_settings(options, dtype, quantize),
          "model": _source(model_path), "tokenizer": _source(tokenizer_path) if tokenizer_path else None,
          "input": os.path.realpath(input_path)}


def read(path: str) -> tuple[dict, list[str]] | None:
  """(the record, the input-line digests) in `path`, None when there is none; ValueError naming the file when it
  is not one of ours. A torn last digest (a kill mid-append) is left out: its answer was never written."""
  if not os.path.exists(path):
    return None
  with open(path, "rb") as f:
    head, _, rest = f.read().partition(b"\n")
  try:
    record = json.loads(head)
  except ValueError:
    record = None
  if not isinstance(record, dict) or record.get("written_by") != _WRITTEN_BY or record.get("format") != FORMAT:
    raise ValueError(f"{path} line 1 is not an infer.py run record: remove it or give another --output")
  digests = rest.split(b"\n")[:-1]
  for i, d in enumerate(digests, 2):
    if len(d) != _DIGEST_CHARS:
      raise ValueError(f"{path} line {i} is not an input-line digest: remove it with its output, or give another "
                       "--output")
  return record, [d.decode() for d in digests]


def _source_change(flag: str, old: dict | None, new: dict | None) -> str:
  """"" when `old` and `new` name the same files, else what changed, for a message."""
  if old is None or new is None:
    if old == new:
      return ""
    return f"{flag}: {old['path'] if old else '(none)'} -> {new['path'] if new else '(none)'}"
  if old["files"] == new["files"] and old["step"] == new["step"]:
    return ""
  if old["path"] != new["path"]:
    return f"{flag}: {old['path']} -> {new['path']}"
  if old["step"] != new["step"]:
    return f"{flag} {new['path']}: checkpoint step {old['step']} -> {new['step']}"
  name = next(n for n in sorted({*old["files"], *new["files"]}) if old["files"].get(n) != new["files"].get(n))
  how = "is new" if name not in old["files"] else "is gone" if name not in new["files"] else "was modified"
  return f"{flag} {new['path']}: {name} {how}"


def differences(old: dict, new: dict, digests: list[str], lines: list[bytes], done: int) -> list[str]:
  """What makes the `done` answers recorded by `old` (with input digests `digests`) not those `new` would give
  for `lines`, one phrase each (empty: resume)."""
  old_settings = {"--quantize": "none", **old["settings"]}  # a record from before --quantize: float weights
  found = [f"{flag}: {old_settings[flag]} -> {value}" for flag, value in new["settings"].items()
           if flag in old_settings and old_settings[flag] != value]
  found += [c for c in (_source_change("--model", old["model"], new["model"]),
                        _source_change("--tokenizer", old["tokenizer"], new["tokenizer"])) if c]
  if len(digests) < done:
    found.append(f"the record covers {len(digests)} of the {done} answers")
  changed = [i for i in range(min(done, len(digests))) if digests[i] != line_digest(lines[i])]
  if changed:
    more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
    found.append(f"input line {changed[0] + 1}{more} changed since its answer was written")
  return found


def _fsync_folder(path: str) -> None:
  fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def write_new(path: str, record: dict) -> None:
  """Writes `record` with no digests, atomically: the file is the old one or the new one, never half of either."""
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  _fsync_folder(path)


def keep_digests(path: str, done: int) -> None:
  """Cuts the digests after the first `done` (those of a batch whose answers were not written)."""
  with open(path, "rb+") as f:
    head = f.readline()
    f.truncate(len(head) + done * _DIGEST_LINE)


def append_digests(f, raw_lines: list[bytes]) -> None:
  """Adds the digests of `raw_lines` to the open record `f`, on disk before their answers are written."""
  f.write("".join(line_digest(raw) + "\n" for raw in raw_lines).encode())
  f.flush()
  os.fsync(f.fileno())
