"""`python -m t5x_lite.sweep` on the demo model shrunk to a few seconds a trial: a 2x2 grid writes the table, the
plot and TensorBoard's HParams data; a rerun runs nothing; a grid that gains a value runs only its new points,
and a driver killed in the middle of them is finished by the next one without repeating a finished trial; two
drivers started at once run each trial once; a trial can be a 2-process jax.distributed job (local processes,
and submitit's local stand-in for Slurm). Config mistakes exit 2 naming the file and line, or the flag."""

import csv
import json
import os
import signal
import struct
import subprocess
import sys
import time

import pytest

pytest.importorskip("optuna")
pytest.importorskip("submitit")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configs", "runs", "demo.gin")
STEPS = 6
TINY = [f"--gin.TRAIN_STEPS={STEPS}", "--gin.SAVE_EVERY=2", "--gin.BATCH_SIZE=2", "--gin.run.max_documents=200",
        "--gin.run.spm_vocab_size=200", "--gin.run.sample_prompts=[]", "--gin.train.log_every=1",
        "--gin.train.eval_every=0", "--gin.train.progress=False", "--gin.T5Config.vocab_size=384",
        "--gin.T5Config.d_model=16", "--gin.T5Config.num_heads=2", "--gin.T5Config.head_dim=8",
        "--gin.T5Config.d_ff=32", "--gin.T5Config.num_encoder_layers=1", "--gin.T5Config.num_decoder_layers=1",
        "--gin.DataConfig.inputs_length=32", "--gin.DataConfig.targets_length=16"]
# The init seed (SEED also seeds the tokenizer's sample) x the data order. Neither changes the compiled step, so all
# trials share one entry of the JAX compilation cache (a learning rate is a constant of the step: a compile each).
GRID = ["--sweep.grid=SEED=[0, 1]", "--sweep.grid=DataConfig.seed=[0, 1]"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  cache = tmp_path_factory.mktemp("jax_cache")
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  env.pop("PYTHONUNBUFFERED", None)  # the driver's lines must reach a pipe as they happen without it
  return env


def _sweep_cmd(sweep_dir, *args, command="run"):
  return [sys.executable, "-m", "t5x_lite.sweep", command, f"--sweep_dir={sweep_dir}",
          *([f"--gin_file={DEMO}", *TINY] if command == "run" else []), *args]


def _sweep(env, sweep_dir, *args, command="run"):
  r = subprocess.run(_sweep_cmd(sweep_dir, *args, command=command), cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=600)
  return r


def _ran(output: str) -> list[str]:
  """The keys of the trials a driver started, from its "trial KEY (...): running" lines."""
  return [line.split()[1] for line in output.splitlines() if line.startswith("trial ") and line.endswith(": running")]


def _study(sweep_dir):
  import optuna  # pylint: disable=import-outside-toplevel
  from t5x_lite.sweep.queue import STUDY  # pylint: disable=import-outside-toplevel
  from optuna.storages import JournalStorage  # pylint: disable=import-outside-toplevel
  from optuna.storages.journal import JournalFileBackend  # pylint: disable=import-outside-toplevel
  storage = JournalStorage(JournalFileBackend(os.path.join(sweep_dir, "study.journal")))
  return optuna.load_study(study_name=STUDY, storage=storage).get_trials(deepcopy=False)


def _attempts(sweep_dir, key) -> int:
  """How many times train.py was started for trial `key` (the executor appends a header per start)."""
  with open(os.path.join(sweep_dir, "logs", f"{key}.p0.log")) as f:
    return sum(line.startswith("=== ") for line in f)


def _results(sweep_dir) -> list[dict]:
  with open(os.path.join(sweep_dir, "results.csv")) as f:
    return list(csv.DictReader(f))


def _events(directory):
  """The Event records of the TensorBoard event files directly in `directory` (TFRecord framing: length, its CRC,
  the record, its CRC)."""
  from tensorboardX.proto.event_pb2 import Event  # pylint: disable=import-outside-toplevel
  out = []
  for name in sorted(os.listdir(directory)):
    if name.startswith("events.out.tfevents"):
      data = open(os.path.join(directory, name), "rb").read()
      i = 0
      while i < len(data):
        (length,) = struct.unpack("<Q", data[i:i + 8])
        out.append(Event.FromString(data[i + 12:i + 12 + length]))
        i += 12 + length + 4
  return out


def _hparams(directory) -> dict:
  """tag -> HParamsPluginData of the hparams summaries in `directory`, and "scalars": tag -> [(step, value)]."""
  from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData  # pylint: disable=import-outside-toplevel
  out = {"scalars": {}}
  for event in _events(directory):
    for v in event.summary.value:
      if v.metadata.plugin_data.plugin_name == "hparams":
        out[v.tag] = HParamsPluginData.FromString(v.metadata.plugin_data.content)
      elif v.HasField("simple_value"):
        out["scalars"].setdefault(v.tag, []).append((event.step, v.simple_value))
  return out


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory, env):
  """One train.py run of the trials' program, so that the JAX compilation cache holds it: the two drivers below
  would otherwise both compile it at once (a trial is ~5 s from the cache, ~20 s with a compile on 2 cores)."""
  workdir = tmp_path_factory.mktemp("warm")
  r = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), f"--gin_file={DEMO}", f"--workdir={workdir}",
                      *TINY], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory, env, warm_cache):  # pylint: disable=unused-argument
  """The 2x2 grid, run by two drivers started at once on one sweep directory."""
  sweep_dir = str(tmp_path_factory.mktemp("grid") / "sweep")
  t0 = time.time()
  procs = [subprocess.Popen(_sweep_cmd(sweep_dir, *GRID), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for _ in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, out[-2000:] + err[-3000:]
  return sweep_dir, [out for out, _ in outs], time.time() - t0


def test_two_drivers_at_once_run_each_trial_once(grid_sweep, env):
  sweep_dir, outs, _ = grid_sweep
  ran = [_ran(out) for out in outs]
  assert len(ran[0] + ran[1]) == 4 and len(set(ran[0] + ran[1])) == 4, ran
  assert ran[0] and ran[1], ran  # both took trials
  trials = _study(sweep_dir)
  assert len(trials) == 4 and all(t.state.name == "COMPLETE" for t in trials)
  for key in ran[0] + ran[1]:
    assert _attempts(sweep_dir, key) == 1
  r = _sweep(env, sweep_dir, command="status")
  assert r.returncode == 0 and "4 trials: 4 done" in r.stdout, r.stdout + r.stderr


def test_grid_writes_table_plot_and_hparams(grid_sweep):
  sweep_dir, _, _ = grid_sweep
  rows = _results(sweep_dir)
  assert sorted((row["SEED"], row["DataConfig.seed"]) for row in rows) == [("0", "0"), ("0", "1"), ("1", "0"),
                                                                          ("1", "1")]
  for row in rows:
    assert row["status"] == "done" and row["steps"] == str(STEPS) and row["attempts"] == "1", row
    assert float(row["best loss"]) <= float(row["final loss"])
    metrics = [json.loads(line) for line in open(os.path.join(sweep_dir, "trials", row["trial"], "metrics.jsonl"))]
    assert float(row["final loss"]) == pytest.approx(metrics[-1]["loss"], rel=1e-5)
  markdown = open(os.path.join(sweep_dir, "results.md")).read()
  assert markdown.startswith("| trial | SEED | DataConfig.seed | status | steps | final loss | best loss |")
  assert markdown.count("| done |") == 4
  with open(os.path.join(sweep_dir, "loss.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # TensorBoard's HParams dashboard: the experiment at the top, a session per trial with its values and status
  tb = os.path.join(sweep_dir, "tensorboard")
  experiment = _hparams(tb)["_hparams_/experiment"].experiment
  assert sorted(h.name for h in experiment.hparam_infos) == ["DataConfig.seed", "SEED"]
  assert sorted(m.name.tag for m in experiment.metric_infos) == ["best_loss", "loss"]
  for row in rows:
    session = _hparams(os.path.join(tb, row["trial"]))
    hparams = session["_hparams_/session_start_info"].session_start_info.hparams
    assert hparams["SEED"].number_value == int(row["SEED"])
    assert hparams["DataConfig.seed"].number_value == int(row["DataConfig.seed"])
    assert session["_hparams_/session_end_info"].session_end_info.status == 1  # STATUS_SUCCESS
    assert [s for s, _ in session["scalars"]["loss"]] == list(range(1, STEPS + 1))
    assert session["scalars"]["loss"][-1][1] == pytest.approx(float(row["final loss"]), rel=1e-5)


def test_rerun_runs_nothing_then_a_new_value_runs_only_new_points_even_when_killed(grid_sweep, env):
  sweep_dir, _, first_seconds = grid_sweep
  before = {t.user_attrs["key"]: t.number for t in _study(sweep_dir)}
  t0 = time.time()
  r = _sweep(env, sweep_dir, *GRID)
  assert r.returncode == 0, r.stderr[-3000:]
  assert _ran(r.stdout) == [] and "queued 0 new" in r.stdout
  assert time.time() - t0 < first_seconds / 2
  assert {t.user_attrs["key"]: t.number for t in _study(sweep_dir)} == before

  # SEED gains a value: two new points. Kill the driver and its trial (SIGKILL to the process group, as a lost
  # machine) once the second new point has a checkpoint; the next driver resumes it and runs nothing else again.
  grid = ["--sweep.grid=SEED=[0, 1, 2]", GRID[1]]
  proc = subprocess.Popen(_sweep_cmd(sweep_dir, *grid), cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True)
  started = []
  for line in proc.stdout:
    if line.rstrip().endswith(": running"):
      started.append(line.split()[1])
      if len(started) == 2:
        break
  assert len(started) == 2 and not set(started) & set(before), started
  checkpoint = os.path.join(sweep_dir, "trials", started[1], "checkpoints", "2")
  deadline = time.time() + 300
  while not os.path.isdir(checkpoint) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.005)
  os.killpg(proc.pid, signal.SIGSTOP)  # freeze first, so that the trial cannot finish between the look and the kill
  os.killpg(proc.pid, signal.SIGKILL)
  proc.communicate()
  assert os.path.isdir(checkpoint)

  r = _sweep(env, sweep_dir, *grid)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  assert "queued 0 new, 0 failed to retry, 1 interrupted to resume" in r.stdout, r.stdout
  assert _ran(r.stdout) == [started[1]]
  log = open(os.path.join(sweep_dir, "logs", f"{started[1]}.p0.log")).read()
  resumed = int(log.split("resuming from the checkpoint of step ")[1].split()[0])
  assert resumed >= 2, log[-2000:]
  rows = {row["trial"]: row for row in _results(sweep_dir)}
  assert len(rows) == 6 and all(row["status"] == "done" and row["steps"] == str(STEPS) for row in rows.values())
  assert rows[started[1]]["attempts"] == "2" and _attempts(sweep_dir, started[1]) == 2
  for key in set(rows) - {started[1]}:  # every other trial ran once
    assert _attempts(sweep_dir, key) == 1, key
  assert {t.user_attrs["key"]: t.number for t in _study(sweep_dir) if t.user_attrs["key"] in before} == before


FLAKY_TRAIN = """
import json, os, sys
workdir = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--workdir=")][0]
os.makedirs(workdir, exist_ok=True)
if not os.path.exists(os.path.join(workdir, "failed_once")):
  open(os.path.join(workdir, "failed_once"), "w").close()
  sys.exit(3)
with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
  for step in range(1, %d + 1):
    f.write(json.dumps({"step": step, "loss": 10.0 / step}) + "\\n")
""" % STEPS


def test_a_failed_trial_is_retried_by_the_next_run(tmp_path, env):
  """A train.py that fails its first start (a stand-in, to be quick): the sweep exits 1 with the trial failed
  ("exit 3"); the same command again retries it, and it is done."""
  fake = tmp_path / "train.py"
  fake.write_text(FLAKY_TRAIN)
  sweep_dir = str(tmp_path / "sweep")
  r = _sweep(env, sweep_dir, "--sweep.grid=SEED=[5]", f"--sweep.train_py={fake}")
  assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
  assert "exit 3 after" in r.stdout and _results(sweep_dir)[0]["status"] == "failed (exit 3)"
  r = _sweep(env, sweep_dir, "--sweep.grid=SEED=[5]", f"--sweep.train_py={fake}")
  assert r.returncode == 0 and "queued 0 new, 1 failed to retry" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
  (row,) = _results(sweep_dir)
  assert (row["status"], row["steps"], row["attempts"], row["final loss"]) == ("done", str(STEPS), "2",
                                                                              f"{10.0 / STEPS:.6g}")


def test_a_trial_of_two_processes(tmp_path, env):
  """`--sweep.processes=2`: each trial is a 2-process jax.distributed run of train.py (gloo on CPU)."""
  sweep_dir = str(tmp_path / "sweep")
  r = _sweep(env, sweep_dir, "--sweep.grid=SEED=[3]", "--sweep.processes=2")
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  (key,) = _ran(r.stdout)
  for i in range(2):
    log = open(os.path.join(sweep_dir, "logs", f"{key}.p{i}.log")).read()
    assert f"--num_processes=2 --process_id={i}" in log
  assert os.path.isfile(os.path.join(sweep_dir, "trials", key, "checkpoints", str(STEPS), "data",
                                     "process_1-of-2.json"))
  (row,) = _results(sweep_dir)
  assert row["status"] == "done" and row["steps"] == str(STEPS)


def test_slurm_executor_through_submitit(tmp_path, env, monkeypatch):
  """The Slurm executor's job: submitit's parameters and sbatch script (no Slurm here: submitit is told srun
  exists), then a 2-task job on submitit's local cluster, which runs the tasks as processes with the job
  environment Slurm would give."""
  from submitit.slurm import slurm  # pylint: disable=import-outside-toplevel
  from t5x_lite.sweep.executors import SlurmExecutor  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(slurm.SlurmExecutor, "affinity", classmethod(lambda cls: 2))
  ex = SlurmExecutor(str(tmp_path / "slurm"), nodes=2, tasks_per_node=4, gpus_per_node=4, cpus_per_task=8,
                     timeout_min=120, partition="gpu", parameters={"slurm_account": "lab"},
                     cluster="slurm").executor("t5x_lite-abc")
  params = ex._executor.parameters  # pylint: disable=protected-access
  assert {k: params[k] for k in ("nodes", "ntasks_per_node", "gpus_per_node", "cpus_per_task", "time", "partition",
                                 "account")} == {"nodes": 2, "ntasks_per_node": 4, "gpus_per_node": 4,
                                                 "cpus_per_task": 8, "time": 120, "partition": "gpu",
                                                 "account": "lab"}
  script = slurm._make_sbatch_string(command="x", folder=str(tmp_path), **params)  # pylint: disable=protected-access
  for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4", "#SBATCH --time=120",
               "#SBATCH --partition=gpu", "#SBATCH --account=lab", "#SBATCH --job-name=t5x_lite-abc"):
    assert line in script, script

  # A job of 2 tasks on submitit's local cluster; each task's command records the flags it was given.
  record = ("import json, os, sys; open(os.path.join(sys.argv[1], os.environ['SUBMITIT_LOCAL_GLOBALID']), 'w')"
            ".write(json.dumps(sys.argv[2:]))")
  workdir = tmp_path / "workdir"
  workdir.mkdir()
  monkeypatch.setenv("PYTHONPATH", REPO)  # for the job's unpickling of slurm_task
  local = SlurmExecutor(str(tmp_path / "local"), tasks_per_node=2, timeout_min=5, cluster="local", poll_s=0.1)
  codes = local.run([sys.executable, "-c", record, str(workdir), "--workdir=x"], str(workdir),
                    str(tmp_path / "trial"), lambda: False)
  assert codes == [0, 0], open(tmp_path / "trial.slurm.log").read()
  flags = [json.loads((workdir / str(i)).read_text()) for i in range(2)]
  port = flags[0][1].rsplit(":", 1)[1]
  for i in range(2):
    assert flags[i] == ["--workdir=x", f"--coordinator_address={flags[0][1].split('=')[1]}", "--num_processes=2",
                        f"--process_id={i}"] and flags[i][1].endswith(f":{port}")


def test_local_executor_gives_each_process_its_flags_and_gpus_and_stops_the_rest_on_a_failure(tmp_path):
  """Process i of a local trial gets --process_id=i of N, one coordinator, and with gpus_per_process its own GPUs;
  when one process fails the others get SIGTERM (they would wait for it at their next collective)."""
  from t5x_lite.sweep.executors import LocalExecutor  # pylint: disable=import-outside-toplevel
  record = ("import json, os, sys; i = sys.argv[-1].split('=')[1]; open(os.path.join(sys.argv[1], i), 'w').write("
            "json.dumps([os.environ['CUDA_VISIBLE_DEVICES'], sys.argv[2:]]))")
  codes = LocalExecutor(2, gpus_per_process=2, poll_s=0.02).run(
      [sys.executable, "-c", record, str(tmp_path)], str(tmp_path / "wd"), str(tmp_path / "t"), lambda: False)
  assert codes == [0, 0]
  got = [json.loads((tmp_path / str(i)).read_text()) for i in range(2)]
  assert got[0][0] == "0,1" and got[1][0] == "2,3"
  coordinator = got[0][1][0]
  assert coordinator.startswith("--coordinator_address=127.0.0.1:")
  assert [g[1] for g in got] == [[coordinator, "--num_processes=2", f"--process_id={i}"] for i in range(2)]

  fail_or_wait = "import sys, time; sys.exit(3) if sys.argv[-1].endswith('=0') else time.sleep(60)"
  t0 = time.time()
  codes = LocalExecutor(2, poll_s=0.02).run([sys.executable, "-c", fail_or_wait], str(tmp_path / "wd"),
                                           str(tmp_path / "u"), lambda: False)
  assert codes == [3, -signal.SIGTERM] and time.time() - t0 < 30


MISTAKES = [  # (a line added to a gin file that includes the demo, the message after "FILE:2: LINE: ")
    ("train.train_stepz = 4", "Configurable 'train' doesn't have a parameter named 'train_stepz'"),
    ("T5Confg.d_model = 32", "No configurable matching 'T5Confg'"),
    ("TRAIN_STEPS = '4'", "train.train_steps must be an integer, got '4' (str)"),
    ("train.train_steps = %TRAIN_STEPZ", "no gin file or --gin flag defines the macro TRAIN_STEPZ"),
]


def _in_process(main, argv, capsys) -> tuple[int, str]:
  """(exit status, stderr) of a CLI's main(argv) called here: a fresh gin config, no JAX start-up per case."""
  import gin  # pylint: disable=import-outside-toplevel
  gin.clear_config()
  try:
    code = main(argv)
  finally:
    gin.clear_config()
  return code, capsys.readouterr().err


def _train_main():
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location("train_py", os.path.join(REPO, "train.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.main


def test_config_mistakes_exit_2_naming_file_and_line_or_flag(tmp_path, env, capsys, monkeypatch):
  """Each kind of mistake, in a gin file (which includes the demo's) given to train.py, or in a sweep's grid or
  variants file: exit 2 with `error: PLACE: ...` (PLACE: FILE:LINE, or the flag), before train.py creates its
  workdir or the sweep its directory. One of each CLI runs as a process; the rest call its main here."""
  monkeypatch.chdir(REPO)
  variants = tmp_path / "variants.jsonl"
  variants.write_text('{"SEED": 1}\n\n{"SEED": "2"}\n')
  sweep_cases = [
      (["--sweep.grid=TRAIN_STEPZ=[4, 8]"], "error: --sweep.grid=TRAIN_STEPZ=[4, 8]: no gin file defines the macro "
                                            "TRAIN_STEPZ"),
      (["--sweep.grid=rsqrt_schedule.base_learning_rat=[0.5]"],
       "error: --sweep.grid=rsqrt_schedule.base_learning_rat=[0.5]: Configurable 'rsqrt_schedule' doesn't have a "
       "parameter named 'base_learning_rat'"),
      (["--sweep.grid=T5Confg.d_model=[8]"], "error: --sweep.grid=T5Confg.d_model=[8]: No configurable matching "
                                             "'T5Confg'"),
      (["--sweep.grid=TRAIN_STEPS=[4, '8']"],
       "error: --sweep.grid=TRAIN_STEPS=[4, '8']: train.train_steps must be an integer, got '8' (str)"),
      ([f"--sweep.variants={variants}"], f"error: {variants}:3: run.seed must be an integer, got '2' (str)"),
      (["--sweep.grid=SEED=[0, 0]"], "error: --sweep.grid=SEED=[0, 0]: a value is given twice"),
  ]
  train_cases = []
  for i, (line, message) in enumerate(MISTAKES):
    (tmp_path / f"mine{i}.gin").write_text(f"include '{DEMO}'\n{line}\n")
    train_cases.append(([f"--gin_file={tmp_path / f'mine{i}.gin'}", f"--workdir={tmp_path / f'wd{i}'}"],
                        f"error: {tmp_path / f'mine{i}.gin'}:2: {line}: {message}"))
  procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for cmd in ([sys.executable, os.path.join(REPO, "train.py"), *train_cases[0][0]],
                       _sweep_cmd(tmp_path / "sweep0", *sweep_cases[0][0]))]
  from t5x_lite.sweep.__main__ import main as sweep_main  # pylint: disable=import-outside-toplevel
  train_main = _train_main()
  outcomes = [("train", i, *_in_process(train_main, args, capsys)) for i, (args, _) in enumerate(train_cases) if i]
  outcomes += [("sweep", i, *_in_process(sweep_main, ["run", f"--sweep_dir={tmp_path / f'sweep{i}'}",
                                                      f"--gin_file={DEMO}", *TINY, *args], capsys))
               for i, (args, _) in enumerate(sweep_cases) if i]
  for which, p in zip(("train", "sweep"), procs):
    _, err = p.communicate(timeout=300)
    outcomes.append((which, 0, p.returncode, err))
  for which, i, code, err in outcomes:
    message = (train_cases if which == "train" else sweep_cases)[i][1]
    assert code == 2 and message in err and "Traceback" not in err, (which, i, message, err[-2000:])
    assert not (tmp_path / (f"wd{i}" if which == "train" else f"sweep{i}")).exists()
