"""What a train.py workdir holds beside its checkpoints, who may write it, and when a run is refused.

    WORKDIR/checkpoints/<step>/      orbax (checkpoints.py)
            model_config.json        the model the run trains
            config.gin               the resolved gin configuration (as T5X keeps it)
            spiece.model, ...        the tokenizer files: a workdir is a model directory
            corpus_fingerprint.json  document count and sha256 of the training corpus
            metrics.jsonl, tensorboard/   (metrics.py)
            train.lock               flock'ed by the run training in it

Every check that can refuse a run only reads, and the run writes nothing here before all of them have passed and
it holds the lock, so a refused run leaves the workdir byte for byte as it was. On several processes, process 0
holds the lock and writes the files; every process reads (the workdir is on a filesystem they share, as orbax
needs).
"""

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import sys
import time

import jax
import numpy as np

LOCK_FILE = "train.lock"
MODEL_CONFIG_FILE = "model_config.json"
FINGERPRINT_FILE = "corpus_fingerprint.json"

# Model config fields a resumed run may change: how the model computes, not what it computes.
RESUMABLE_CHANGES = ("dtype", "remat", "dropout_rate", "classifier_dropout")


class WorkdirInUse(RuntimeError):
  """Another live run holds the workdir's lock."""


def check_same_model(workdir: str, config_json: str) -> None:
  """ValueError when the run in `workdir` (its model_config.json) trained another model than `config_json`.

  Without it a resumed run with, say, another activation would go on silently with weights trained for the old
  one, and one with other shapes would fail inside orbax's restore without naming the cause.
  """
  path = os.path.join(workdir, MODEL_CONFIG_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    before = json.load(f)
  now = json.loads(config_json)
  changed = [k for k in sorted(set(before["config"]) | set(now["config"]))
             if k not in RESUMABLE_CHANGES and before["config"].get(k) != now["config"].get(k)]
  if before["family"] != now["family"] or changed:
    diffs = "; ".join(f"{k}: {before['config'].get(k)!r} -> {now['config'].get(k)!r}" for k in changed)
    raise ValueError(f"{workdir} holds a run of another model ({diffs or before['family'] + ' -> ' + now['family']})"
                     f": resume it with its own configuration ({path}), or give a new --workdir")


def stored_model_config(workdir: str) -> str | None:
  """The model_config.json of the run in `workdir` (config_to_json's text), or None."""
  path = os.path.join(workdir, MODEL_CONFIG_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return f.read()


def check_same_tokenizer(workdir: str, files: dict[str, bytes], source: str) -> None:
  """ValueError when a resumed run brings tokenizer files (from `source`) other than those the workdir's run was
  trained with: ids would silently change meaning. A workdir without tokenizer files (an older run) takes them."""
  from t5x_lite.convert.hf import tokenizer_files  # pylint: disable=import-outside-toplevel
  held = tokenizer_files(workdir)
  if not held:
    return
  differ = sorted(name for name in set(held) | set(files) if held.get(name) != files.get(name))
  if differ:
    raise ValueError(f"{workdir} was trained with another tokenizer ({', '.join(differ)} differ from {source}'s): "
                     f"resume with the run's own tokenizer (run.tokenizer_dir='{workdir}'), or give a new --workdir")


def corpus_fingerprint(documents) -> dict:
  """Count and sha256 of the documents (strings or JSON records), order-sensitive."""
  digest = hashlib.sha256()
  for doc in documents:
    digest.update(json.dumps(doc, sort_keys=True).encode())
  return {"documents": len(documents), "sha256": digest.hexdigest()}


def warn_if_other_corpus(workdir: str, fingerprint: dict) -> None:
  """A resumed run whose documents differ from the first run's says so: the data iterator resumes by position, so
  it goes on over the new corpus from the old one's place."""
  path = os.path.join(workdir, FINGERPRINT_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    before = json.load(f)
  if before != fingerprint:
    print(f"WARNING: {workdir} was trained on another corpus ({before['documents']} documents, now "
          f"{fingerprint['documents']}); a resumed run continues the data iterator by position over the new one",
          file=sys.stderr)


def write_run_files(workdir: str, *, config_json: str, gin_config: str, tokenizer_files: dict[str, bytes],
                    fingerprint: dict | None) -> None:
  """Writes the files that describe the run (process 0 only; each file replaced atomically). The corpus
  fingerprint is kept from the first start once the run has checkpoints (`fingerprint` None)."""
  if jax.process_index() != 0:
    return
  files = {MODEL_CONFIG_FILE: (config_json + "\n").encode(), "config.gin": gin_config.encode(), **tokenizer_files}
  if fingerprint is not None:
    files[FINGERPRINT_FILE] = json.dumps(fingerprint).encode()
  for name, content in files.items():
    _write_atomically(os.path.join(workdir, name), content)


def _write_atomically(path: str, content: bytes) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(content)
  os.replace(tmp, path)


@contextlib.contextmanager
def run_lock(workdir: str):
  """Holds WORKDIR/train.lock (an exclusive flock, taken by process 0 for all processes) for the block; raises
  WorkdirInUse naming the holder when another run has it. The kernel drops a flock with its process, so a killed
  run never leaves the workdir locked."""
  handle, holder = None, ""
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    handle = open(os.path.join(workdir, LOCK_FILE), "a+")  # pylint: disable=consider-using-with
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      handle.seek(0)
      holder = handle.read().strip() or "another process"
      handle.close()
      handle = None
  granted = handle is not None
  if jax.process_count() > 1:  # every process learns process 0's answer (and none waits for a refused one)
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    granted = bool(multihost_utils.broadcast_one_to_all(np.int32(granted)))
  if not granted:
    raise WorkdirInUse(f"{workdir} is in use by another train.py run ({holder or 'on process 0 of this job'}): "
                       "wait for it to end, or give another --workdir")
  try:
    if handle is not None:
      handle.seek(0)
      handle.truncate()
      handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
      handle.flush()
    yield
  finally:
    if handle is not None:
      fcntl.flock(handle, fcntl.LOCK_UN)
      handle.close()
