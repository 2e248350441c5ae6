"""The tiny tokenizer and data (tulu3.demo.data, ~1 s) for tests that run --dry-run's checks."""

from __future__ import annotations

import pytest

from tulu3.demo.data import make_tiny_data


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, str]:
    return make_tiny_data(tmp_path_factory.mktemp("tiny_data"), n_sft=16, n_dpo=8, n_rlvr=8,
                          n_eval=8, n_rm=8)
