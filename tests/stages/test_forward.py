"""tulu3.stages.forward: eval mode, the collecting forward-only stage, and frozen copies.

The last test builds the tiny Llama in one gloo process: a frozen copy holds the source's
weights (by name), is frozen, leaves every RNG stream where it was, and measures the same
reference log-probs as the source through the real forward-only schedule.
"""

from __future__ import annotations

import pytest
import torch

from tulu3.stages.forward import CollectStage, eval_mode, freeze
from tulu3.testing import run_distributed_test


def test_eval_mode_restores_each_chunk_and_grad() -> None:
    chunks = [torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)]
    chunks[1].eval()
    with eval_mode(chunks):
        assert not any(c.training for c in chunks) and not torch.is_grad_enabled()
    assert chunks[0].training and not chunks[1].training and torch.is_grad_enabled()
    with pytest.raises(RuntimeError), eval_mode(chunks):
        raise RuntimeError("a failing pass")
    assert chunks[0].training and torch.is_grad_enabled()


def test_freeze() -> None:
    (chunk,) = freeze([torch.nn.Linear(2, 2)])
    assert not chunk.training and not any(p.requires_grad for p in chunk.parameters())


class _Rows:
    """A measure: row sums of the output, keyed by example id (-1: a filler row)."""

    uses_hidden = False

    def __call__(self, batch: dict, output: torch.Tensor, model: torch.nn.Module
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return batch["example_ids"], {"sum": output.sum(dim=-1), "first": output[:, 0]}


def test_collect_stage_keeps_rows_by_key_and_drops_fillers() -> None:
    stage = CollectStage(_Rows())
    assert not stage.uses_hidden
    output = torch.arange(6.0).reshape(3, 2).requires_grad_()
    loss, count, metrics = stage.loss({"example_ids": torch.tensor([4, -1, 9])}, output, None)
    stage.loss({"example_ids": torch.tensor([2])}, torch.tensor([[7.0, 1.0]]), None)
    assert float(loss) == 0.0 and int(count) == 2 and metrics["rows"].tolist() == [2.0, 0.0]
    assert {k: float(v) for k, v in stage.outputs["sum"].items()} == {4: 1.0, 9: 9.0, 2: 8.0}
    assert float(stage.outputs["first"][9]) == 4.0
    assert not stage.outputs["sum"][4].requires_grad


def _frozen_copy_checks() -> dict:
    import random

    import numpy as np
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from tulu3.config import load_config
    from tulu3.data.examples import DPOExample
    from tulu3.data.packing import collate_dpo
    from tulu3.model.build import build_model_chunks
    from tulu3.parallel.groups import ProcessGroups
    from tulu3.parallel.init import init_model_parallel
    from tulu3.parallel.layout import make_layout
    from tulu3.stages.dpo.reference import reference_pass
    from tulu3.stages.dpo.stage import ReferenceLogps
    from tulu3.stages.forward import frozen_copy
    from tulu3.stages.logprobs import VocabShard

    cfg = load_config(None, ["model.vocab=64"])
    layout = make_layout(cfg, 1)
    init_model_parallel(layout, seed=1)
    groups = ProcessGroups.current()
    chunks = build_model_chunks(cfg.model, layout, groups)
    with torch.no_grad():  # weights that no fresh build has
        for param in chunks[0].parameters():
            param.add_(0.01)
    tracker = {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()}
    draws_before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    copy = frozen_copy(cfg.model, layout, groups, chunks)
    out = {
        "rng_kept": torch.equal(torch.get_rng_state(), draws_before[0])
        and np.array_equal(np.random.get_state()[1], draws_before[1])
        and random.getstate() == draws_before[2]
        and all(torch.equal(v, tracker[k]) for k, v in get_cuda_rng_tracker().get_states().items()),
        "same_weights": all(torch.equal(a, b) for a, b in zip(copy[0].parameters(),
                                                               chunks[0].parameters(),
                                                               strict=True)),
        "frozen": not copy[0].training and not any(p.requires_grad for p in copy[0].parameters()),
    }
    rng = random.Random(0)
    pairs = [DPOExample([rng.randrange(64) for _ in range(4)], [rng.randrange(64)] * 3,
                        [rng.randrange(64)] * 2, index=i) for i in range(4)]
    micro = [collate_dpo(pairs[i:i + 2], 32, pack=False) for i in (0, 2)]
    measure = ReferenceLogps(VocabShard(None, 0, 64), fused=True)
    chunks[0].train()
    mine = reference_pass(chunks, micro, measure, layout)
    theirs = reference_pass(copy, micro, measure, layout)
    out.update(keys=sorted(mine), equal=mine == theirs, source_training=chunks[0].training)
    return out


@pytest.mark.distributed
def test_frozen_copy_and_forward_pass() -> None:
    out = run_distributed_test(_frozen_copy_checks, 1)[0]
    assert out["rng_kept"] and out["same_weights"] and out["frozen"]
    assert out["keys"] == [0, 1, 2, 3] and out["equal"]
    assert out["source_training"]  # eval mode only for the pass
