"""`sweep run`: queue the points that need a run, then take queued trials one at a time until none is left, each
through an executor, and write the results. Several drivers on one sweep directory share the queue (queue.py),
so starting N drivers runs N trials at once.

    DIR/study.journal        the trials and their states (Optuna)
    DIR/trials/KEY/          each trial's train.py workdir (KEY: space.trial_key)
    DIR/logs/KEY.pI.log      process I's output, every attempt appended
    DIR/results.csv, results.md, loss.png, tensorboard/   (results.py)
"""

import os
import signal
import sys
import time

from t5x_lite.sweep import results
from t5x_lite.sweep.queue import Queue


class _Stop:
  """SIGTERM or Ctrl-C: the running trial saves (its processes get SIGTERM) and no further trial starts."""

  def __init__(self):
    self.signal = None

  def __enter__(self):
    def handler(signum, frame):  # pylint: disable=unused-argument
      if self.signal is None:
        print(f"\nsweep: {signal.Signals(signum).name}: stopping after the running trial saves", file=sys.stderr)
      self.signal = signum
    self._previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    return self

  def __exit__(self, *exc):
    for s, previous in self._previous.items():
      signal.signal(s, previous)

  def __call__(self) -> bool:
    return self.signal is not None


def _describe(bindings: dict) -> str:
  return ", ".join(f"{n}={v!r}" for n, v in bindings.items())


def _saved_step(workdir: str) -> int:
  """The step of the latest finished checkpoint (orbax renames a step's folder to its number once complete)."""
  try:
    return max((int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()), default=0)
  except FileNotFoundError:
    return 0


def _outcome(trial, codes: list[int], workdir: str, metric: str, stopped: bool) -> tuple[str, float | None, str]:
  """(state, metric value, reason) of a trial whose processes exited with `codes`."""
  steps = results.last_step(workdir)
  if stopped or (all(c == 0 for c in codes) and steps < trial.train_steps):
    saved = _saved_step(workdir)
    return "FAIL", None, f"interrupted ({f'saved at step {saved}' if saved else 'nothing saved'})"  # next run resumes
  if any(c != 0 for c in codes):
    return "FAIL", None, f"exit {next(c for c in codes if c != 0)}"
  curve = results.metric_curve(workdir, metric)
  if not curve:
    return "FAIL", None, f"no {metric!r} in {workdir}'s metrics"
  return "COMPLETE", curve[-1][1], ""


def _log(message: str) -> None:
  print(message, flush=True)  # a line as it happens, also into a pipe (whoever watches the sweep reads them)


def run(sweep_dir: str, trials: list, executor, metric: str, mode: str, log=_log) -> int:
  """Runs `trials` (plan.Trial) in `sweep_dir` until each is done or has failed once in this run. Returns 0 when
  none of them failed, 1 when one did, 128 + N after signal N."""
  queue = Queue(sweep_dir)
  queue.set_info(metric=metric, mode=mode)
  by_key = {t.key: t for t in trials}
  queued = queue.enqueue_missing({t.key: {"bindings": t.point.bindings, "train_steps": t.train_steps}
                                  for t in trials})
  counts = {what: sum(v == what for v in queued.values()) for what in ("new", "retry", "resume")}
  log(f"sweep {sweep_dir}: {len(trials)} points; queued {counts['new']} new, {counts['retry']} failed to retry, "
      f"{counts['resume']} interrupted to resume; executor: {executor.describe()}")
  os.makedirs(os.path.join(sweep_dir, "logs"), exist_ok=True)
  with _Stop() as stop:
    while not stop():
      claim = queue.claim(set(by_key))
      if claim is None:
        break
      trial = by_key[claim.key]
      workdir = results.trial_dir(sweep_dir, claim.key)
      log(f"trial {claim.key} ({_describe(trial.point.bindings)}): running")
      try:
        codes = executor.run(trial.command, workdir, os.path.join(sweep_dir, "logs", claim.key), stop)
      except BaseException as e:
        queue.finish(claim, None, "FAIL", f"driver error: {type(e).__name__}: {e}")
        raise
      state, value, reason = _outcome(trial, codes, workdir, metric, stop())
      queue.finish(claim, value, state, reason)
      seconds = time.time() - claim.started
      log(f"trial {claim.key}: " + (f"done in {seconds:.1f} s, {metric} {value:.4g}" if state == "COMPLETE" else
                                    f"{reason} after {seconds:.1f} s (log: {sweep_dir}/logs/{claim.key}.p0.log)"))
    table = [r for r in results.rows(queue.trials(), sweep_dir, metric, mode) if r["trial"] in by_key]
    results.write_all(sweep_dir, table, metric)
    if stop():
      return 128 + stop.signal
  log(results.to_markdown(table, metric))
  elsewhere = [r["trial"] for r in table if r["status"] in ("running", "queued")]
  if elsewhere:
    log(f"{len(elsewhere)} trial(s) still running in another driver: {', '.join(elsewhere)}")
  return 1 if any(r["status"] not in ("done", "running", "queued") for r in table) else 0
