"""A sweep's results: one row per point (its bindings, status, steps, final and best metric, time), read from the
study (queue.py) and each trial's WORKDIR/metrics.jsonl (eval metrics, `eval/NAME`, from eval_metrics.jsonl), and
written as DIR/results.csv, DIR/results.md, DIR/loss.png (one line per trial) and DIR/tensorboard/ (TensorBoard's
HParams dashboard: an experiment summary and one session per trial with its metric curve, written with
tensorboardX's protos, no TensorFlow).
"""

import csv
import io
import json
import math
import os
import shutil
import time

from optuna.trial import TrialState

from t5x_lite.sweep.queue import flocked

STATUS = {TrialState.COMPLETE: "done", TrialState.RUNNING: "running", TrialState.WAITING: "queued",
          TrialState.FAIL: "failed", TrialState.PRUNED: "failed"}


def trial_dir(sweep_dir: str, key: str) -> str:
  return os.path.join(sweep_dir, "trials", key)


def metric_curve(workdir: str, metric: str) -> list[tuple[int, float]]:
  """(step, value) of `metric` in the trial's metrics.jsonl ("eval/NAME": eval_metrics.jsonl), the last line of
  a step counting; a torn last line (a killed run) is skipped."""
  name, file = (metric[5:], "eval_metrics.jsonl") if metric.startswith("eval/") else (metric, "metrics.jsonl")
  by_step = {}
  try:
    with open(os.path.join(workdir, file)) as f:
      for line in f:
        try:
          record = json.loads(line)
        except ValueError:
          continue
        if name in record:
          by_step[int(record["step"])] = float(record[name])
  except FileNotFoundError:
    pass
  return sorted(by_step.items())


def last_step(workdir: str) -> int:
  curve = metric_curve(workdir, "step")
  return curve[-1][0] if curve else 0


def _status(trial) -> str:
  status = STATUS[trial.state]
  reason = trial.user_attrs.get("reason", "")
  if trial.state == TrialState.FAIL and reason:
    return "interrupted" if reason.startswith(("interrupted", "orphaned")) else f"failed ({reason})"
  return status


def rows(trials: list, sweep_dir: str, metric: str, mode: str = "min") -> list[dict]:
  """One row per point (key), in the order its first trial was queued: the latest trial's status; steps, final
  and best `metric` from its workdir; seconds summed over all its attempts."""
  by_key = {}
  for t in trials:
    by_key.setdefault(t.user_attrs.get("key"), []).append(t)
  out = []
  for key, attempts in by_key.items():
    if key is None:
      continue
    latest = attempts[-1]
    seconds = sum(t.user_attrs.get("seconds", 0.0) for t in attempts)
    if latest.state == TrialState.RUNNING and latest.datetime_start is not None:
      seconds += max(0.0, time.time() - latest.datetime_start.timestamp())
    curve = metric_curve(trial_dir(sweep_dir, key), metric)
    values = [v for _, v in curve if not math.isnan(v)]
    best = (min if mode == "min" else max)(values) if values else None
    out.append({"trial": key, "bindings": latest.user_attrs.get("bindings", {}), "status": _status(latest),
                "steps": last_step(trial_dir(sweep_dir, key)), "final": curve[-1][1] if curve else None,
                "best": best, "seconds": round(seconds, 1),
                "attempts": sum(t.state != TrialState.WAITING for t in attempts), "curve": curve})
  return out


def _names(table: list[dict]) -> list[str]:
  return list(dict.fromkeys(n for r in table for n in r["bindings"]))


def _cell(value) -> str:
  """A metric as 6 significant digits; a binding as written in JSON (1.0 stays 1.0), a string bare."""
  if value is None:
    return ""
  return value if isinstance(value, str) else json.dumps(value)


def _number(value) -> str:
  return "" if value is None else f"{value:.6g}"


def flat(table: list[dict], metric: str) -> tuple[list[str], list[list[str]]]:
  """The table as a header and rows of strings (the CSV's and the Markdown's)."""
  names = _names(table)
  header = ["trial", *names, "status", "steps", f"final {metric}", f"best {metric}", "seconds", "attempts"]
  body = [[r["trial"], *(_cell(r["bindings"].get(n)) for n in names), r["status"], str(r["steps"]),
           _number(r["final"]), _number(r["best"]), _number(r["seconds"]), str(r["attempts"])] for r in table]
  return header, body


def to_csv(table: list[dict], metric: str) -> str:
  out = io.StringIO()
  header, body = flat(table, metric)
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(header)
  writer.writerows(body)
  return out.getvalue()


def to_markdown(table: list[dict], metric: str) -> str:
  header, body = flat(table, metric)
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
  return "\n".join(lines) + "\n"


def label(row: dict) -> str:
  return ", ".join(f"{n}={_cell(v)}" for n, v in row["bindings"].items()) or row["trial"]


def plot(table: list[dict], metric: str, path: str) -> None:
  """One line per trial: `metric` against the step."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  from matplotlib.ticker import MaxNLocator  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(8, 5))
  for row in table:
    if row["curve"]:
      steps, values = zip(*row["curve"])
      ax.plot(steps, values, label=f"{label(row)} ({row['status']})", marker="." if len(steps) < 20 else None)
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_xlabel("step")
  ax.set_ylabel(metric)
  ax.grid(alpha=0.3)
  if any(r["curve"] for r in table):
    ax.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _hparam_value(value):
  """A value the HParams dashboard shows: numbers, strings and bools as they are, anything else as JSON."""
  return value if isinstance(value, (bool, int, float, str)) else json.dumps(value)


def write_hparams(table: list[dict], metric: str, logdir: str) -> None:
  """TensorBoard's HParams data in `logdir`: the experiment (every swept name with its values, the metric and its
  best) at the top, and per trial a run `logdir/KEY` with the session's hparams, its metric curve, the best value
  and its status (success, failure, running)."""
  from google.protobuf import struct_pb2  # pylint: disable=import-outside-toplevel
  from tensorboardX import FileWriter  # pylint: disable=import-outside-toplevel
  from tensorboardX.proto import api_pb2, plugin_hparams_pb2  # pylint: disable=import-outside-toplevel
  from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata  # pylint: disable=import-outside-toplevel

  def summary(tag: str, data) -> Summary:
    content = plugin_hparams_pb2.HParamsPluginData(version=0, **data).SerializeToString()
    meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="hparams", content=content))
    return Summary(value=[Summary.Value(tag=tag, metadata=meta)])

  best_tag = f"best_{metric}"
  infos = []
  for name in _names(table):
    values = list(dict.fromkeys(_hparam_value(r["bindings"][name]) for r in table if name in r["bindings"]))
    kind = ("DATA_TYPE_BOOL" if all(isinstance(v, bool) for v in values) else
            "DATA_TYPE_STRING" if any(isinstance(v, str) for v in values) else "DATA_TYPE_FLOAT64")
    domain = struct_pb2.ListValue()
    domain.extend([str(v) if kind == "DATA_TYPE_STRING" else v for v in values])
    infos.append(api_pb2.HParamInfo(name=name, type=api_pb2.DataType.Value(kind), domain_discrete=domain))
  experiment = api_pb2.Experiment(hparam_infos=infos, metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=t))
                                                                    for t in (metric, best_tag)])
  writer = FileWriter(logdir)
  writer.add_summary(summary("_hparams_/experiment", {"experiment": experiment}))
  writer.close()
  for row in table:
    start = plugin_hparams_pb2.SessionStartInfo(group_name=row["trial"])
    for name, value in row["bindings"].items():
      value = _hparam_value(value)
      if isinstance(value, bool):
        start.hparams[name].bool_value = value
      elif isinstance(value, str):
        start.hparams[name].string_value = value
      else:
        start.hparams[name].number_value = float(value)
    writer = FileWriter(os.path.join(logdir, row["trial"]))
    writer.add_summary(summary("_hparams_/session_start_info", {"session_start_info": start}))
    for step, value in row["curve"]:
      writer.add_summary(Summary(value=[Summary.Value(tag=metric, simple_value=value)]), step)
    if row["best"] is not None:
      writer.add_summary(Summary(value=[Summary.Value(tag=best_tag, simple_value=row["best"])]), row["steps"])
    if row["status"] not in ("running", "queued"):  # a session without an end is one still running
      status = "STATUS_SUCCESS" if row["status"] == "done" else "STATUS_FAILURE"
      end = plugin_hparams_pb2.SessionEndInfo(status=api_pb2.Status.Value(status))
      writer.add_summary(summary("_hparams_/session_end_info", {"session_end_info": end}))
    writer.close()


def _write_atomically(path: str, text: str) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def write_all(sweep_dir: str, table: list[dict], metric: str) -> dict:
  """results.csv, results.md, loss.png and tensorboard/ in `sweep_dir` (under DIR/report.lock: drivers that end
  together take turns). Returns name -> path."""
  paths = {"csv": os.path.join(sweep_dir, "results.csv"), "markdown": os.path.join(sweep_dir, "results.md"),
           "plot": os.path.join(sweep_dir, "loss.png"), "tensorboard": os.path.join(sweep_dir, "tensorboard")}
  with flocked(os.path.join(sweep_dir, "report.lock")):
    _write_atomically(paths["csv"], to_csv(table, metric))
    _write_atomically(paths["markdown"], to_markdown(table, metric))
    tmp_png = os.path.join(sweep_dir, f".loss.tmp-{os.getpid()}.png")
    plot(table, metric, tmp_png)
    os.replace(tmp_png, paths["plot"])
    tmp_tb = os.path.join(sweep_dir, f".tensorboard.tmp-{os.getpid()}")
    shutil.rmtree(tmp_tb, ignore_errors=True)
    write_hparams(table, metric, tmp_tb)
    shutil.rmtree(paths["tensorboard"], ignore_errors=True)
    os.replace(tmp_tb, paths["tensorboard"])
  return paths
