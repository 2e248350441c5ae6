"""Test-wide settings: one thread per process (2 cores, several gloo ranks), quiet warnings."""

import os
import sys
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without CUDA, Triton kernels run in its interpreter. triton.language reads TRITON_INTERPRET when
# first imported (megatron imports triton), so it is set before any test module is collected;
# model.fused=auto never picks the interpreter (tulu3/model/fusions.py).
if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
# Shared test helpers live beside the tests they serve (tests/parallel/parity_harness.py,
# tests/trainer/trainer_harness.py, tests/stages/rlvr/rlvr_harness.py,
# tests/checkpoint/ckpt_testlib.py).
for helpers in ("parallel", "trainer", "stages/rlvr", "checkpoint"):
    sys.path.insert(0, str(Path(__file__).parent / helpers))


@pytest.fixture(autouse=True)
def _compat_layer_stays_out_of_pytest():
    """The CPU compat layer must be installed by the rank processes only: installed in the pytest
    process, every later fork inherits it half-way and computes wrong logits (about 1e-2, found
    in the HF round-trip tests). A test that runs megatron in-process must do so in a child."""
    def installed() -> bool:
        cpu = sys.modules.get("tulu3.patches.cpu")
        return cpu is not None and cpu.is_installed()

    before = installed()
    yield
    if installed() and not before:
        pytest.fail("this test installed the CPU compat layer in the pytest process (run "
                    "megatron in a forked child: tulu3.testing.run_in_child)", pytrace=False)
