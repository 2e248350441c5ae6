"""The one ParallelLayout: derived sizes, megatron's arguments, checkpoint keys, and the split a
second model of another depth (PPO's value model) uses beside the policy."""

from __future__ import annotations

import pytest

from tulu3.parallel.layout import LayoutError, ParallelLayout

UNEVEN = dict(account_for_embedding_in_pipeline_split=True,
              account_for_loss_in_pipeline_split=True)


def test_sizes_and_megatron_arguments() -> None:
    layout = ParallelLayout(world_size=16, tp=2, pp=2, vpp=2, sequence_parallel=True)
    assert (layout.dp, layout.model_parallel, layout.metric_copies) == (4, 4, 2)
    init = layout.megatron_init_args()
    assert init["tensor_model_parallel_size"] == 2 and init["pipeline_model_parallel_size"] == 2
    assert init["virtual_pipeline_model_parallel_size"] == 2
    assert layout.transformer_config_args()["sequence_parallel"] is True
    assert layout.same_ranks(layout.checkpoint_record())
    assert not ParallelLayout(world_size=16, tp=4).same_ranks(layout.checkpoint_record())


def test_value_model_of_another_depth_gets_its_own_split() -> None:
    """405B (126 layers) at PP16 needs the uneven split; Tülu 3's 8B value model (32 layers)
    splits evenly and must not count the embedding and loss (34 does not split over 16)."""
    policy = ParallelLayout(world_size=128, tp=8, pp=16, **UNEVEN)
    policy.check_model(128, 8, 126)
    value = policy.for_layers(32)
    assert value.split_extra == 0 and (value.tp, value.pp, value.dp) == (8, 16, 1)
    value.check_model(32, 8, 32)
    with pytest.raises(LayoutError, match="does not divide model.layers=32 \\+ 2"):
        policy.check_model(32, 8, 32)
    assert policy.for_layers(126) is policy  # the policy's own depth keeps the uneven split
    even = ParallelLayout(world_size=16, tp=2, pp=2)
    assert even.for_layers(32) is even
