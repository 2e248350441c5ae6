"""A verifier for the RLVR tests, importable by the verifier pool's workers (this directory is on
sys.path): ``coin`` scores a response by a hash of its text (about half correct: rewards vary
even for a random model), and misbehaves on purpose for some ground truths: "hang" sleeps past
the time limit, "raise" raises, "crash" kills its worker process when TULU3_TEST_CRASH=1 (else
it raises: both score 0 as errors, so runs with and without crashes stay comparable)."""

from __future__ import annotations

import os
import time
import zlib

from tulu3.rewards import register_verifier


@register_verifier("coin")
def verify_coin(response: str, ground_truth: str) -> bool:
    if ground_truth == "hang":
        time.sleep(600)  # the pool's time limit interrupts it
    if ground_truth == "crash" and os.environ.get("TULU3_TEST_CRASH") == "1":
        os._exit(3)  # the worker process dies
    if ground_truth in ("raise", "crash"):
        raise RuntimeError("this verifier always fails")
    return zlib.crc32(response.encode()) % 2 == 0
