#!/usr/bin/env bash
# Set up a virtual environment (if needed) and run the tiny Tülu 3 pipeline on CPU:
# data -> curation -> SFT -> DPO -> RLVR -> HF export -> eval -> runs/demo/report.md
#   bash scripts/demo.sh [--steps N] [--layout tp2pp2|tp2dp2] [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
python -m tulu3.demo "$@"
