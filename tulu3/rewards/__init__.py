"""Verifiable rewards for RLVR and evaluation: GSM8K, MATH and IFEval verifiers, sandboxed.

    from tulu3.rewards import VerifierPool, rlvr_reward, verify

    verify("gsm8k", "... so she has 72 apples.", "72")        # VerifyResult(correct=True, ...)
    with VerifierPool(workers=2, timeout_s=5.0) as pool:       # model output: always via the pool
        results = pool.score([("math", response, gt), ...])
    rewards = [rlvr_reward(r, has_eos) for r, has_eos in zip(results, eos_flags)]

Importing this package is light (no sympy, no langdetect: those load on first use), so the
trainer can import it; the heavy parts run in the pool's worker processes.
"""

from tulu3.rewards import gsm8k as _gsm8k  # noqa: F401  (registers "gsm8k")
from tulu3.rewards import ifeval as _ifeval  # noqa: F401  (registers "ifeval")
from tulu3.rewards import math_verifier as _math  # noqa: F401  (registers "math")
from tulu3.rewards.base import (
    VerifyResult,
    get_verifier,
    register_verifier,
    registered_datasets,
    rlvr_reward,
    verify,
)
from tulu3.rewards.sandbox import PoolStats, VerifierPool
from tulu3.rewards.summary import pass_at_k, summarize

__all__ = [
    "PoolStats",
    "VerifierPool",
    "VerifyResult",
    "get_verifier",
    "pass_at_k",
    "register_verifier",
    "registered_datasets",
    "rlvr_reward",
    "summarize",
    "verify",
]
