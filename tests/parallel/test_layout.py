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


def test_context_parallel_specs_packing_and_padding() -> None:
    """CP runs with the torch and te specs (not local); rows pad to 2 x cp (x tp under SP);
    TE takes packed rows as THD, one row per micro-batch, and not under CP; RLVR refuses CP."""
    from tulu3.config import ConfigError, load_config
    from tulu3.stages.preflight import preflight

    layout = ParallelLayout(world_size=8, tp=2, cp=2, sequence_parallel=True)
    assert (layout.dp, layout.pad_multiple, layout.metric_copies) == (2, 8, 4)
    for spec in ("torch", "te"):
        layout.check_spec(spec)
    with pytest.raises(LayoutError, match="parallel.cp=2 needs model.spec=torch or te"):
        layout.check_spec("local")
    layout.check_packing("te", pack=False, micro_batch=4)
    layout.check_packing("torch", pack=True, micro_batch=4)
    with pytest.raises(LayoutError, match="not supported"):
        layout.check_packing("te", pack=True, micro_batch=1)
    with pytest.raises(LayoutError, match="train.micro_batch=1"):
        ParallelLayout(world_size=2).check_packing("te", pack=True, micro_batch=2)
    # RLVR runs at CP2 (generation without CP on the same ranks): the layout and RLVR checks
    # pass, and preflight goes on to the data paths
    cfg = load_config(None, ["parallel.cp=2"])
    with pytest.raises(ConfigError, match="data.train is not set"):
        preflight(cfg, "rlvr", world_size=2)
