"""Test-wide settings: one thread per process (2 cores, several gloo ranks), quiet warnings."""

import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
# Shared test helpers live beside the tests they serve (tests/parallel/parity_harness.py,
# tests/trainer/trainer_harness.py, tests/stages/rlvr/rlvr_harness.py,
# tests/checkpoint/ckpt_testlib.py).
for helpers in ("parallel", "trainer", "stages/rlvr", "checkpoint"):
    sys.path.insert(0, str(Path(__file__).parent / helpers))
