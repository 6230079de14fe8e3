"""How a trial's `train.py` command runs: N processes on this host (`LocalExecutor`, the default) or a Slurm job
through submitit (`SlurmExecutor`), one process per task. With more than one process each gets train.py's
`--coordinator_address / --num_processes / --process_id` flags, so a trial is one `jax.distributed` job; train.py
knows nothing of sweeps.

`run(command, workdir, log_prefix, stopping)` returns the processes' exit statuses. When `stopping()` turns true
(the driver got SIGTERM or Ctrl-C) the trial's processes get SIGTERM, on which train.py saves a checkpoint and
exits 0; the driver then records the trial as interrupted, and the next `sweep run` resumes it.
"""

import ctypes
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time

GRACE_S = 300  # after SIGTERM, how long a trial's processes may take to save before they are killed


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def distributed_flags(coordinator: str, num_processes: int, process_id: int) -> list[str]:
  return [f"--coordinator_address={coordinator}", f"--num_processes={num_processes}", f"--process_id={process_id}"]


def wait_for_workdir(workdir: str, timeout_s: float = GRACE_S) -> None:
  """Waits until no process holds WORKDIR/train.lock: the processes of a trial whose driver was killed get SIGTERM
  (see _die_with_parent) and may still be saving when the next driver resumes the trial."""
  path = os.path.join(workdir, "train.lock")
  deadline = time.time() + timeout_s
  while os.path.exists(path):
    with open(path) as handle:
      try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(handle, fcntl.LOCK_UN)
        return
      except BlockingIOError:
        if time.time() > deadline:
          return  # train.py will refuse the workdir, naming its holder
    time.sleep(0.5)


def _die_with_parent() -> None:
  """In the child before exec: SIGTERM when the driver dies (Linux), so that a driver killed outright leaves no
  training behind it (the trial saves and exits, and the next driver resumes it)."""
  if sys.platform.startswith("linux"):
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class LocalExecutor:
  """`processes` train.py processes on this host, a jax.distributed job when more than one (gloo on CPU). Each
  process sees every accelerator of the host unless `gpus_per_process` gives process i its own
  (CUDA_VISIBLE_DEVICES = i*k .. i*k+k-1), as one process per GPU wants."""

  def __init__(self, processes: int = 1, gpus_per_process: int | None = None, poll_s: float = 0.2):
    if processes < 1:
      raise ValueError(f"--sweep.processes must be >= 1, got {processes}")
    if gpus_per_process is not None and gpus_per_process < 1:
      raise ValueError(f"--sweep.gpus_per_process must be >= 1, got {gpus_per_process}")
    self.processes, self.gpus_per_process, self.poll_s = processes, gpus_per_process, poll_s

  def describe(self) -> str:
    gpus = f", {self.gpus_per_process} GPU(s) each" if self.gpus_per_process else ""
    return f"local, {self.processes} process{'es' if self.processes > 1 else ''}{gpus}"

  def environment(self, i: int) -> dict:
    """Process i's environment."""
    env = dict(os.environ)
    if self.gpus_per_process:
      k = self.gpus_per_process
      env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in range(i * k, i * k + k))
    return env

  def run(self, command: list[str], workdir: str, log_prefix: str, stopping) -> list[int]:
    wait_for_workdir(workdir)
    n = self.processes
    coordinator = f"127.0.0.1:{free_port()}" if n > 1 else None
    procs = []
    for i in range(n):
      cmd = command + (distributed_flags(coordinator, n, i) if coordinator else [])
      with open(f"{log_prefix}.p{i}.log", "a") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        log.flush()
        # pylint: disable-next=subprocess-popen-preexec-fn
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.environment(i),
                                      preexec_fn=_die_with_parent))
    return _wait(procs, stopping, self.poll_s)


def _wait(procs, stopping, poll_s: float) -> list[int]:
  """Waits for `procs`; SIGTERM to all when `stopping()` or when one of them failed (the others would wait for it
  at their next collective), SIGKILL GRACE_S later."""
  termed_at = None
  while any(p.poll() is None for p in procs):
    failed = any(p.returncode not in (None, 0) for p in procs)
    if termed_at is None and (stopping() or failed):
      termed_at = time.time()
      for p in procs:
        if p.poll() is None:
          p.send_signal(signal.SIGTERM)
    if termed_at is not None and time.time() - termed_at > GRACE_S:
      for p in procs:
        if p.poll() is None:
          p.kill()
    time.sleep(poll_s)
  return [p.returncode for p in procs]


def slurm_task(command: list[str], workdir: str, port: int) -> int:
  """One task of a trial's Slurm job (submitit runs it on each task): train.py as process `global_rank` of
  `num_tasks`, the coordinator on the job's first node. Returns train.py's exit status."""
  import submitit  # pylint: disable=import-outside-toplevel
  env = submitit.JobEnvironment()
  cmd = list(command)
  if env.num_tasks > 1:
    cmd += distributed_flags(f"{env.hostnames[0]}:{port}", env.num_tasks, env.global_rank)
  wait_for_workdir(workdir)
  proc = subprocess.Popen(cmd)  # pylint: disable=consider-using-with
  # submitit forwards Slurm's SIGTERM (preemption, scancel, time limit) to this process; pass it on to train.py,
  # which saves and exits.
  signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
  return proc.wait()


class SlurmExecutor:
  """One Slurm job per trial through submitit: `nodes` x `tasks_per_node` processes (one per GPU, typically),
  logs in DIR/slurm/. `cluster` is submitit's: None picks Slurm where `sbatch` exists; "local" runs the tasks as
  processes here (how the tests run it) and "debug" in the driver itself. `parameters` adds submitit's own
  (`slurm_partition`, `slurm_account`, `slurm_qos`, `mem_gb`, `slurm_additional_parameters`, ...)."""

  def __init__(self, folder: str, *, nodes: int = 1, tasks_per_node: int = 1, gpus_per_node: int | None = None,
               cpus_per_task: int | None = None, timeout_min: int = 60, partition: str | None = None,
               parameters: dict | None = None, cluster: str | None = None, poll_s: float = 2.0):
    self.folder, self.cluster, self.poll_s = folder, cluster, poll_s
    self.params = {"nodes": nodes, "tasks_per_node": tasks_per_node, "timeout_min": timeout_min}
    if gpus_per_node is not None:
      self.params["gpus_per_node"] = gpus_per_node
    if cpus_per_task is not None:
      self.params["cpus_per_task"] = cpus_per_task
    if partition is not None:
      self.params["slurm_partition"] = partition
    self.params.update(parameters or {})

  def describe(self) -> str:
    return f"slurm ({self.cluster or 'auto'}), {self.params}"

  def executor(self, name: str):
    """The submitit executor a trial named `name` is submitted with."""
    import submitit  # pylint: disable=import-outside-toplevel
    ex = submitit.AutoExecutor(folder=self.folder, cluster=self.cluster)
    local = ex.cluster in ("local", "debug")
    # submitit's local cluster takes only its generic parameters; slurm_* ones are for Slurm
    params = {k: v for k, v in self.params.items() if not (local and k.startswith("slurm_"))}
    ex.update_parameters(name=name, **params)
    return ex

  def run(self, command: list[str], workdir: str, log_prefix: str, stopping) -> list[int]:
    name = os.path.basename(log_prefix)
    # One port for the job's coordinator, from the trial's name (the driver cannot see the first node's ports).
    port = 20000 + int.from_bytes(name.encode(), "little") % 20000
    job = self.executor(f"t5x_lite-{name}").submit(slurm_task, command, workdir, port)
    with open(f"{log_prefix}.slurm.log", "a") as log:
      log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} job {job.job_id}: {' '.join(command)}\n")
    cancelled = False
    while not job.done():
      if stopping() and not cancelled:
        job.cancel(check=False)  # scancel: SIGTERM to the tasks first, then they save and exit
        cancelled = True
      time.sleep(self.poll_s)
    try:
      return [int(r) for r in job.results()]
    except Exception as e:  # pylint: disable=broad-except  (submitit raises for a failed or cancelled job)
      with open(f"{log_prefix}.slurm.log", "a") as log:
        log.write(f"job {job.job_id} failed: {e}\n")
      return [143 if cancelled else 1]
