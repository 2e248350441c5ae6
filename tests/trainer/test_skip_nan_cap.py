"""train.max_skipped_nan: skip_nan stops the run after N consecutive skipped steps."""

from __future__ import annotations

import pytest

from tulu3.config import RunFault, load_config
from tulu3.trainer import check_skipped


def test_consecutive_skips_stop_at_the_cap() -> None:
    check_skipped(2, 10, cap=3)  # below the cap: go on
    check_skipped(50, 60, cap=0)  # 0: no cap
    with pytest.raises(RunFault, match=r"steps 8-10: 3 consecutive steps skipped .*"
                                       r"train.max_skipped_nan=3"):
        check_skipped(3, 10, cap=3)
    assert load_config(None, ["train.max_skipped_nan=2"]).train.max_skipped_nan == 2
