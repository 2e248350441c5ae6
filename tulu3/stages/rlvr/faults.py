"""RLVR steps whose verifiers time out or crash: warn, then stop the run.

A timed-out or crashed verification scores 0 (tulu3.rewards.sandbox), so a run whose verifiers
all fail trains on a reward of zero for every response and would exit 0 having learnt nothing.
"""

from __future__ import annotations

import logging

from tulu3.config import RLVRConfig, RunFault

log = logging.getLogger(__name__)


def check_verifier_failures(failed: int, total: int, step: int, rl: RLVRConfig,
                            streak: int) -> int:
    """Warn when more than ``rl.max_verify_fail_frac`` of a step's ``total`` verifications
    failed (timed out or crashed); raise :class:`RunFault` after ``rl.max_verify_fail_steps``
    such steps in a row (0: never). Returns the new streak of failing steps."""
    if total <= 0 or failed / total <= rl.max_verify_fail_frac:
        return 0
    streak += 1
    what = (f"step {step}: {failed} of {total} verifications timed out or crashed "
            f"(> rlvr.max_verify_fail_frac={rl.max_verify_fail_frac})")
    if rl.max_verify_fail_steps and streak >= rl.max_verify_fail_steps:
        raise RunFault(f"{what}, {streak} steps in a row: every failed verification scores 0, "
                       "so the run learns nothing; raise rlvr.verifier_timeout_s or check the "
                       "verifiers (python -m tulu3.rewards score)")
    log.warning(f"{what}; raise rlvr.verifier_timeout_s if this persists")
    return streak
