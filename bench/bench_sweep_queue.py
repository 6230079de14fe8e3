"""How many queued trials run twice when several sweep drivers share one Optuna study (the sweep's trial queue).

  python bench/bench_sweep_queue.py [--drivers 4] [--trials 200] [--repeats 3]

Each case enqueues `--trials` explicit trials, then starts `--drivers` processes at once; each takes waiting
trials until none is left, records what it got and completes it after a short random "run" (0-2 ms). Counted:
trials taken by two drivers (run twice), and trials the study created beyond the queue (`ask()` samples a fresh,
parameterless trial when it finds the queue empty, as it does when another driver took the last one).

  journal + ask    JournalStorage(JournalFileBackend(file)); the driver calls study.ask()
  journal + claim  the same storage; the driver claims a waiting trial itself with
                   storage.set_trial_state_values(id, RUNNING), which is True only for the driver whose
                   WAITING -> RUNNING record comes first in the journal (what t5x_lite.sweep.queue does)
  sqlite + ask     RDBStorage("sqlite:///file"), study.ask()
  sqlite + claim   RDBStorage, the same claim
  enqueue race     the drivers each enqueue the same `--trials` points with enqueue_trial(skip_if_exists=True)

Measured on the 2-core machine of this project (optuna 5.1.0, SQLAlchemy 2.1.9), 4 drivers x 200 trials, 3 runs:
see t5x_lite/sweep/queue.py (the numbers are kept there, beside the choice they justify).
"""

import argparse
import collections
import json
import multiprocessing
import os
import random
import tempfile
import time

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

STUDY = "queue"


def _storage(kind: str, path: str):
  if kind == "journal":
    return JournalStorage(JournalFileBackend(path))
  return RDBStorage(f"sqlite:///{path}", engine_kwargs={"connect_args": {"timeout": 60}})


def _drive(kind: str, path: str, how: str, out: str, start_at: float) -> None:
  optuna.logging.set_verbosity(optuna.logging.ERROR)
  storage = _storage(kind, path)
  study = optuna.load_study(study_name=STUDY, storage=storage)
  study_id = storage.get_study_id_from_name(STUDY)
  rng = random.Random(os.getpid())
  taken, blank = [], 0
  while time.time() < start_at:
    time.sleep(0.001)
  while True:
    if how == "ask":
      if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        break
      trial = study.ask()
      point = trial.user_attrs.get("i")
      if point is None:  # the queue emptied between the look and the ask: a fresh trial was sampled
        blank += 1
        study.tell(trial, state=TrialState.FAIL)
        continue
      number = trial.number
    else:
      number = None
      for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        try:
          if storage.set_trial_state_values(trial_id, TrialState.RUNNING):
            number, point = t.number, t.user_attrs["i"]
            break
        except optuna.exceptions.UpdateFinishedTrialError:
          continue
      if number is None:
        break
    taken.append(point)
    time.sleep(rng.random() * 0.002)
    try:
      study.tell(number, 0.0)
    except (ValueError, optuna.exceptions.UpdateFinishedTrialError):  # another driver ran it too, and finished first
      pass
  with open(out, "w") as f:
    json.dump({"taken": taken, "blank": blank}, f)


def _enqueue(kind: str, path: str, trials: int, out: str, start_at: float) -> None:
  optuna.logging.set_verbosity(optuna.logging.ERROR)
  study = optuna.load_study(study_name=STUDY, storage=_storage(kind, path))
  while time.time() < start_at:
    time.sleep(0.001)
  for i in range(trials):
    study.enqueue_trial({"i": i}, user_attrs={"i": i}, skip_if_exists=True)
  with open(out, "w") as f:
    json.dump({}, f)


def run_case(kind: str, how: str, drivers: int, trials: int) -> dict:
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "study.journal" if kind == "journal" else "study.db")
    study = optuna.create_study(study_name=STUDY, storage=_storage(kind, path))
    if how != "enqueue":
      for i in range(trials):
        study.enqueue_trial({"i": i}, user_attrs={"i": i})
    ctx = multiprocessing.get_context("spawn")
    start_at = time.time() + 3.0  # every driver is up and waiting at its start line by then
    outs = [os.path.join(d, f"out{k}.json") for k in range(drivers)]
    target = _enqueue if how == "enqueue" else _drive
    procs = [ctx.Process(target=target, args=(kind, path, trials if how == "enqueue" else how, out, start_at))
             for out in outs]
    t0 = time.time()
    for p in procs:
      p.start()
    for p in procs:
      p.join()
    seconds = time.time() - t0 - 3.0
    if how == "enqueue":
      counts = collections.Counter(t.user_attrs["i"] for t in study.get_trials(deepcopy=False))
      return {"points": trials, "enqueued": sum(counts.values()), "duplicated": sum(c > 1 for c in counts.values()),
              "seconds": round(seconds, 2)}
    results = [json.load(open(out)) for out in outs]
    counts = collections.Counter(i for r in results for i in r["taken"])
    return {"trials": trials, "run": sum(counts.values()), "run_twice": sum(c > 1 for c in counts.values()),
            "never_run": trials - len(counts), "blank_trials": sum(r["blank"] for r in results),
            "seconds": round(seconds, 2)}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--drivers", type=int, default=4)
  p.add_argument("--trials", type=int, default=200)
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  print(f"optuna {optuna.__version__}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, "
        f"{args.drivers} drivers x {args.trials} trials")
  for kind, how in [("journal", "ask"), ("journal", "claim"), ("sqlite", "ask"), ("sqlite", "claim"),
                    ("journal", "enqueue"), ("sqlite", "enqueue")]:
    for _ in range(args.repeats):
      print(f"{kind:8s} {how:8s}", run_case(kind, how, args.drivers, args.trials), flush=True)


if __name__ == "__main__":
  main()
