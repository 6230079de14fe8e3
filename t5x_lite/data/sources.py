"""Corpora: reading documents from text and JSONL files.

A document is a string (plain text: one document per non-empty line) or a dict (JSONL: one JSON object per
line, e.g. {"text": ...} for pretraining or {"inputs": ..., "targets": ...} for supervised seq2seq). Files are
read whole into memory, which suits the corpora this project trains on; a corpus too large for that would
use one of grain's random-access sources (e.g. ArrayRecord) in place of the list.
"""

from __future__ import annotations

import array
import bisect
import glob
import json
import os
from typing import Sequence, Union

Document = Union[str, dict]


def _expand(paths: str | Sequence[str]) -> list[str]:
  """Paths and glob patterns -> the sorted file list (sorted, so every host sees the same order)."""
  patterns = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
  files = []
  for pattern in map(os.fspath, patterns):
    matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    if not matches:
      raise FileNotFoundError(f"no file matches {pattern}")
    files.extend(matches)
  return files


class Documents(list):
  """A list of documents that remembers each one's file and line, for error messages (`origin(i)`)."""

  def __init__(self):
    super().__init__()
    self._paths: list[str] = []
    self._starts: list[int] = []  # index of each file's first document
    self._lines = array.array("q")  # 1-based line of every document

  def add(self, doc: Document, path: str, line: int) -> None:
    if not self._paths or self._paths[-1] != path:
      self._paths.append(path)
      self._starts.append(len(self))
    self.append(doc)
    self._lines.append(line)

  def origin(self, i: int) -> str:
    return f"{self._paths[bisect.bisect_right(self._starts, i) - 1]}:{self._lines[i]}"


def read_documents(paths: str | Sequence[str]) -> Documents:
  """All documents of `paths` (files or glob patterns), in file order then line order.

  `*.jsonl` / `*.json` files hold one JSON object per line (blank lines skipped); any other file is plain text
  with one document per non-empty line (the newline removed). A record's "images" paths are taken relative to its
  file's folder. A byte-order mark opening a file is dropped.
  ValueError names the file and line of text that is not UTF-8 or a JSON line that is not an object.
  """
  docs = Documents()
  for path in _expand(paths):
    if os.path.isdir(path):
      raise IsADirectoryError(f"{path} is a directory: give files or glob patterns such as {path}/*.txt")
    is_json = path.endswith((".jsonl", ".json"))
    with open(path, "rb") as f:
      for n, raw in enumerate(f, 1):
        try:
          line = raw.decode("utf-8-sig" if n == 1 else "utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
          raise ValueError(f"{path}:{n}: not UTF-8 text (byte {e.start} of the line)") from None
        if not line.strip():
          continue
        if not is_json:
          docs.add(line, path, n)
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{n}: not a JSON object: {e}") from None
        if not isinstance(record, dict):
          raise ValueError(f"{path}:{n}: not a JSON object (a {type(record).__name__}); JSONL documents are "
                           'objects such as {"text": ...} or {"inputs": ..., "targets": ...}')
        docs.add(_images_from(record, path), path, n)
  return docs


def _images_from(record: dict, path: str) -> dict:
  """The record with the relative paths of its "images" list made relative to its JSONL file's folder, as
  infer.py reads them; anything else is left for the pipeline's checks to name."""
  images = record.get("images")
  if isinstance(images, list) and all(isinstance(p, str) for p in images):
    folder = os.path.dirname(os.path.abspath(path))
    record = {**record, "images": [p if os.path.isabs(p) else os.path.join(folder, p) for p in images]}
  return record


def document_text(doc: Document, key: str = "text") -> str:
  """The text of a pretraining document: the string itself, or `doc[key]` of a JSON record."""
  if isinstance(doc, str):
    return doc
  if key not in doc:
    raise KeyError(f"document has no {key!r} field: {sorted(doc)}")
  return doc[key]
