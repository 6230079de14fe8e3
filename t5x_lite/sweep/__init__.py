"""Gin sweeps of train.py runs (`python -m t5x_lite.sweep`): points (space), their configs checked before any runs
(plan), the trial queue shared by drivers (queue, Optuna's journal file), executors (local processes, Slurm via
submitit), the driver loop (driver) and the results (CSV, Markdown, PNG, TensorBoard HParams). Needs the `sweep`
extra: `pip install t5x_lite[sweep]`."""
