#!/usr/bin/env bash
# Set up a virtual environment (if needed) and run the whole test suite on CPU.
#   bash scripts/test.sh            # everything
#   bash scripts/test.sh tests/data # a subset (any pytest arguments)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
ruff check .
if command -v shellcheck >/dev/null; then
  shellcheck -x launch/*.sh launch/slurm/*.sbatch scripts/*.sh
fi
python -m pytest -n "${PYTEST_WORKERS:-2}" --dist loadfile -q -p no:cacheprovider "${@:-tests}"
