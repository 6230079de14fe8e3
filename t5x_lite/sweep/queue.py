"""The sweep's trials and their states, kept by Optuna in a journal file (DIR/study.journal): no server, and any
number of drivers on hosts that share the directory.

Each point of the sweep is an explicit Optuna trial (enqueued WAITING with its key and bindings as user attrs);
a driver claims one by moving it WAITING -> RUNNING through the storage, and tells COMPLETE with the metric or
FAIL with a reason. Optuna's own samplers play no part: a GridSampler study resumed after a point failed did not
retry it (optuna 5.1.0, checked by hand: once every point has a finished trial, failed or not, the grid is done),
and a grid that gains a value is a new search space to it.

Why the journal file and not SQLite, measured with bench/bench_sweep_queue.py (4 drivers started at once on one
study, 200 queued trials, 3 runs each; optuna 5.1.0, 2-core machine under load 7.7):
  journal + our claim       0 trials run twice (of 600), none missed
  journal + study.ask()     0 run twice, but 1-2 parameterless trials per run (ask samples a fresh trial when
                            another driver took the last waiting one)
  SQLite + study.ask()      15-20 of 200 run twice (SQLite has no SELECT ... FOR UPDATE)
  SQLite + our claim        22-31 of 200 run twice
  enqueue_trial(skip_if_exists=True) by the 4 drivers at once: journal 1-2 points of 200 enqueued twice or more,
                            SQLite 115-134
So: the journal file, claims through the storage (only the driver whose WAITING -> RUNNING record comes first in
the journal gets True), and enqueueing (which reads, then writes) under an flock on DIR/queue.lock. The claim is
taken under the same flock, with the point's own flock (DIR/locks/KEY.lock, held while the trial runs): a RUNNING
trial whose lock is free belongs to a driver that died, and the next driver re-queues it (it resumes from its
checkpoints). The kernel drops an flock with its process, so a killed driver leaves nothing locked.
"""

import contextlib
import fcntl
import json
import os
import time

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

STUDY = "sweep"


@contextlib.contextmanager
def flocked(path: str, blocking: bool = True):
  """Holds an exclusive flock on `path` for the block; yields False (holding nothing) if not `blocking` and another
  process has it."""
  with open(path, "a") as handle:
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
      yield False
      return
    try:
      yield True
    finally:
      fcntl.flock(handle, fcntl.LOCK_UN)


class PointLock:
  """The flock a driver holds on DIR/locks/KEY.lock while it runs that point's trial."""

  def __init__(self, path: str):
    self.path = path
    self._handle = None

  def try_acquire(self) -> bool:
    handle = open(self.path, "a")  # pylint: disable=consider-using-with
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      handle.close()
      return False
    self._handle = handle
    return True

  def held_elsewhere(self) -> bool:
    """True while another process holds it (checked by taking and dropping it)."""
    if not self.try_acquire():
      return True
    self.release()
    return False

  def release(self) -> None:
    if self._handle is not None:
      fcntl.flock(self._handle, fcntl.LOCK_UN)
      self._handle.close()
      self._handle = None


class Claim:
  """A trial this driver runs: its Optuna number, key, and the point lock it holds."""

  def __init__(self, number: int, key: str, lock: PointLock, started: float):
    self.number, self.key, self.lock, self.started = number, key, lock, started


class Queue:
  """The study of the sweep in `sweep_dir` (created on first use)."""

  def __init__(self, sweep_dir: str):
    self.dir = sweep_dir
    os.makedirs(os.path.join(sweep_dir, "locks"), exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per enqueued trial
    self.storage = JournalStorage(JournalFileBackend(os.path.join(sweep_dir, "study.journal")))
    self.study = optuna.create_study(study_name=STUDY, storage=self.storage, load_if_exists=True)
    self._study_id = self.storage.get_study_id_from_name(STUDY)

  def _queue_lock(self):
    return flocked(os.path.join(self.dir, "queue.lock"))

  def point_lock(self, key: str) -> PointLock:
    return PointLock(os.path.join(self.dir, "locks", f"{key}.lock"))

  def trials(self) -> list:
    """Every trial of the study (FrozenTrial), oldest first."""
    return self.study.get_trials(deepcopy=False)

  def set_info(self, **info) -> None:
    for name, value in info.items():
      self.study.set_user_attr(name, value)

  def info(self) -> dict:
    return dict(self.study.user_attrs)

  def enqueue_missing(self, points: dict) -> dict:
    """Queues each point (key -> user attrs: bindings, ...) that has no finished, queued or live trial: new points,
    points whose last trial failed (retried) and points whose driver died (its RUNNING trial is told FAIL,
    "orphaned"). Returns key -> what was done ("new", "retry", "resume")."""
    done = {}
    with self._queue_lock():
      by_key = {}
      for t in self.trials():
        by_key.setdefault(t.user_attrs.get("key"), []).append(t)
      for key, attrs in points.items():
        states = [t.state for t in by_key.get(key, [])]
        if TrialState.COMPLETE in states or TrialState.WAITING in states:
          continue
        if TrialState.RUNNING in states:
          if self.point_lock(key).held_elsewhere():
            continue  # another driver runs it now
          for t in by_key[key]:
            if t.state == TrialState.RUNNING:
              self._set_trial_attr(t.number, "reason", "orphaned: its driver stopped")
              self.study.tell(t.number, state=TrialState.FAIL)
          done[key] = "resume"
        elif states:  # the last one failed; an interrupted one resumes from its checkpoints
          reason = by_key[key][-1].user_attrs.get("reason", "")
          done[key] = "resume" if reason.startswith(("interrupted", "orphaned")) else "retry"
        else:
          done[key] = "new"
        self.study.enqueue_trial({}, user_attrs={"key": key, **attrs})
    return done

  def claim(self, keys) -> Claim | None:
    """Takes a waiting trial of one of `keys` (oldest first) and that point's lock, or None when none waits."""
    with self._queue_lock():
      for t in self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        key = t.user_attrs.get("key")
        if key not in keys:
          continue
        trial_id = self.storage.get_trial_id_from_study_id_trial_number(self._study_id, t.number)
        try:
          if not self.storage.set_trial_state_values(trial_id, TrialState.RUNNING):
            continue  # another driver's claim came first in the journal
        except optuna.exceptions.UpdateFinishedTrialError:
          continue
        lock = self.point_lock(key)
        if not lock.try_acquire():  # cannot happen while every driver claims under the queue lock; say so if it does
          self.finish(Claim(t.number, key, lock, time.time()), None, "FAIL", "another driver runs this point")
          continue
        return Claim(t.number, key, lock, time.time())
    return None

  def _set_trial_attr(self, number: int, name: str, value) -> None:
    trial_id = self.storage.get_trial_id_from_study_id_trial_number(self._study_id, number)
    self.storage.set_trial_user_attr(trial_id, name, value)

  def finish(self, claim: Claim, value: float | None, state: str, reason: str = "", **attrs) -> None:
    """Records how the claimed trial ended (state "COMPLETE" with the metric `value`, or "FAIL" with `reason`) and
    releases its point."""
    try:
      self._set_trial_attr(claim.number, "seconds", round(time.time() - claim.started, 3))
      for name, v in {"reason": reason, **attrs}.items():
        if v not in ("", None):
          self._set_trial_attr(claim.number, name, json.loads(json.dumps(v)))
      if state == "COMPLETE":
        self.study.tell(claim.number, value)
      else:
        self.study.tell(claim.number, state=TrialState.FAIL)
    finally:
      claim.lock.release()
