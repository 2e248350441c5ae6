"""An RLVR step whose verifications mostly time out or crash warns; several in a row stop."""

from __future__ import annotations

import logging

import pytest

from tulu3.config import RLVRConfig, RunFault
from tulu3.stages.rlvr.faults import check_verifier_failures


def test_failing_verifiers_warn_then_stop(caplog) -> None:
    rl = RLVRConfig(max_verify_fail_frac=0.5, max_verify_fail_steps=2)
    assert check_verifier_failures(4, 8, 1, rl, streak=0) == 0  # 4/8 is not more than half
    with caplog.at_level(logging.WARNING):
        assert check_verifier_failures(5, 8, 2, rl, streak=0) == 1
    assert "step 2: 5 of 8 verifications timed out or crashed" in caplog.text
    assert check_verifier_failures(0, 8, 3, rl, streak=1) == 0  # a good step resets
    with pytest.raises(RunFault, match="step 4: 8 of 8 .* 2 steps in a row"):
        check_verifier_failures(8, 8, 4, rl, streak=1)
    never = RLVRConfig(max_verify_fail_steps=0)
    assert check_verifier_failures(8, 8, 9, never, streak=99) == 100
