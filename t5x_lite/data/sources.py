"""Corpora: reading documents from text and JSONL files.

A document is a string (plain text: one document per non-empty line) or a dict (JSONL: one JSON object per
line, e.g. {"text": ...} for pretraining or {"inputs": ..., "targets": ...} for supervised seq2seq). Files are
read whole into memory, which suits the corpora this project trains on; a corpus too large for that would
use one of grain's random-access sources (e.g. ArrayRecord) in place of the list.
"""

from __future__ import annotations

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


def read_documents(paths: str | Sequence[str]) -> list[Document]:
  """All documents of `paths` (files or glob patterns), in file order then line order.

  `*.jsonl` / `*.json` files hold one JSON object per line (blank lines skipped); any other file is plain text
  with one document per non-empty line (the newline removed).
  """
  docs: list[Document] = []
  for path in _expand(paths):
    is_json = path.endswith((".jsonl", ".json"))
    with open(path, encoding="utf-8") as f:
      for n, line in enumerate(f, 1):
        line = line.rstrip("\r\n")
        if not line.strip():
          continue
        if not is_json:
          docs.append(line)
          continue
        try:
          docs.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{n}: not a JSON object: {e}") from e
  return docs


def document_text(doc: Document, key: str = "text") -> str:
  """The text of a pretraining document: the string itself, or `doc[key]` of a JSON record."""
  if isinstance(doc, str):
    return doc
  if key not in doc:
    raise KeyError(f"document has no {key!r} field: {sorted(doc)}")
  return doc[key]
