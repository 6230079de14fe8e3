"""A real-text corpus available on every machine with no download: the docstrings of the installed Python
standard library, read from source with `ast` (nothing is imported or executed). The demo run pretrains on it.
"""

import ast
import hashlib
import os
import sysconfig

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3", "turtledemo"}


def _docstrings(path: str):
  try:
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), filename=path)
  except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
    return
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      doc = ast.get_docstring(node)
      if doc and len(doc.split()) >= 8:
        yield " ".join(doc.split())  # one line per docstring: whitespace runs collapse


def stdlib_docstrings(max_documents: int | None = None) -> list[str]:
  """Docstrings of at least 8 words, in a fixed order (sorted file paths, then source order)."""
  root = sysconfig.get_paths()["stdlib"]
  docs = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
    for name in sorted(filenames):
      if name.endswith(".py"):
        docs.extend(_docstrings(os.path.join(dirpath, name)))
        if max_documents and len(docs) >= max_documents:
          return docs[:max_documents]
  return docs


def split_train_eval(docs: list[str], eval_fraction: float = 0.02) -> tuple[list[str], list[str]]:
  """A deterministic held-out split by content hash (the same on every machine and run)."""
  train, held_out = [], []
  for d in docs:
    bucket = int(hashlib.md5(d.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    (held_out if bucket < eval_fraction else train).append(d)
  return train, held_out
