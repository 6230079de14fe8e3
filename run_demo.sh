#!/usr/bin/env bash
# Installs t5x_lite into .venv and runs the embedded default: a small UL2 pretraining run of a tiny T5 on the
# installed Python standard library's docstrings, then greedy generation from its checkpoint.
#   bash run_demo.sh [WORKDIR] [extra train.py flags, e.g. --gin.TRAIN_STEPS=40]
set -euo pipefail
cd "$(dirname "$0")"
WORKDIR="${1:-workdir/demo}"
shift || true
python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e .
exec .venv/bin/python train.py --gin_file=configs/runs/demo.gin --workdir="$WORKDIR" "$@"
