"""The rollout batch: labels and response mask aligned, micro-batches in tulu3's format, and the
RLVR settings that cannot run rejected before anything is built."""

from __future__ import annotations

import pytest
import torch

from tulu3.config import ConfigError, load_config
from tulu3.parallel.layout import ParallelLayout
from tulu3.rollout.batch import IGNORE, RolloutBatch
from tulu3.stages.rlvr.loop import validate_rlvr


def test_labels_and_mask_cover_exactly_the_response() -> None:
    batch = RolloutBatch.build([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], [0, 1], pad_id=0)
    assert batch.tokens.tolist() == [[1, 2, 3, 5, 6], [4, 7, 8, 9, 0]]
    # position t predicts token t + 1: the response tokens are predicted from len(prompt) - 1
    assert batch.labels.tolist() == [[IGNORE, IGNORE, 5, 6, IGNORE], [7, 8, 9, IGNORE, IGNORE]]
    assert batch.mask.tolist() == [[0, 0, 1, 1, 0], [1, 1, 1, 0, 0]]
    assert batch.response_lengths().tolist() == [2, 3]


def test_micro_batches_and_captured_values() -> None:
    batch = RolloutBatch.build([[1, 2, 3], [4], [5, 6]], [[7], [8, 9], [1]], [0, 0, 1], 0)
    batch.put("old_logprobs", {0: torch.arange(10.0), 1: -torch.arange(10.0),
                               2: torch.ones(10)})
    assert batch.per_token["old_logprobs"][1].tolist() == [-0.0, -1.0, 0.0, 0.0]  # masked
    first, second = batch.micro_batches([2, 1, 0], 2, ["old_logprobs"])
    assert first["example_ids"].tolist() == [2, 1] and first["tokens"].shape == (2, 3)
    assert first["seq_ids"].tolist() == [[0, 0, 0], [1, 1, 1]]
    assert first["position_ids"].tolist() == [[0, 1, 2]] * 2
    assert first["loss_mask"].tolist() == [[0, 1, 0], [1, 1, 0]]
    assert second["tokens"].tolist() == [[1, 2, 3, 7]] and second["old_logprobs"].shape == (1, 4)


@pytest.mark.parametrize("overrides, message", [
    (["rlvr.rollout_backend=vllm"], "not implemented"),
    (["rlvr.algo=grpo", "rlvr.samples_per_prompt=1"], "samples_per_prompt >= 2"),
    (["train.global_batch=6"], "do not split over"),
    (["rlvr.mini_batches=3"], "mini_batches=3"),
    (["train.micro_batch=3"], "train.micro_batch=3"),
])
def test_settings_that_cannot_run(overrides: list[str], message: str) -> None:
    cfg = load_config(None, ["train.global_batch=8", "train.micro_batch=1", *overrides])
    with pytest.raises(ConfigError, match=message):
        validate_rlvr(cfg, ParallelLayout(world_size=4, tp=1, pp=1))
    validate_rlvr(load_config(None, ["train.global_batch=8"]), ParallelLayout(world_size=4))
