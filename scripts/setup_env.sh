#!/usr/bin/env bash
# Source me: create .venv with Python 3.11+ and install tulu3 with its test extras (CPU torch).
# torch==2.13.0 is pinned first so pip takes the local CPU build instead of a CUDA one.
set -euo pipefail
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
if ! python -c "import tulu3, megatron.core, pytest_timeout" 2>/dev/null; then
  python -m pip install -q --upgrade pip
  python -m pip install -q "torch==2.13.0"
  python -m pip install -q -e ".[test]"
fi
