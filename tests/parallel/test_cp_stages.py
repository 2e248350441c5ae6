"""DPO (all five losses) and the PPO / GRPO policy losses at context parallel 2 equal one
process: the step-1 loss and every gradient (fp32, tiny Llama, 1e-5 as tests/parallel).

The per-sequence reductions (DPO's sums over a response, GRPO's per-response mean) are where a
CP split could go wrong: every CP rank holds only part of each sequence. Padded and packed DPO
rows, the logits and the fused (hidden-state) log-prob paths are all covered; row lengths are
not multiples of 2 x CP.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core import parallel_state as ps
from parity_harness import (
    collate,
    collate_packed,
    examples,
    gradients,
    max_diff,
    merge,
    setup_layout,
)

from tulu3.stages.dpo.losses import loss_names
from tulu3.stages.dpo.stage import REF_KEYS, DPOStage, pair_sums
from tulu3.stages.rlvr.stage import RLVRPolicyStage
from tulu3.testing import run_distributed_test

pytestmark = pytest.mark.distributed

TOL = 1e-5
RUNS = [*[("dpo", name, False, False) for name in loss_names()],
        ("dpo", "dpo_norm", True, False), ("dpo", "wpo", True, True),
        ("rlvr", "ppo", False, False), ("rlvr", "grpo", False, True)]
"""(stage, loss, packed rows, fused log-probs)."""


def _dpo_micro(packed: bool) -> list[dict]:
    """Two micro-batches of two pairs (sequences 2i / 2i + 1 of the harness's examples are
    pair i), with fixed reference log-prob sums near the policy's."""
    items = examples(8)
    for position, item in enumerate(items):
        item["index"] = position // 2
    gen = torch.Generator().manual_seed(3)
    micro = []
    for group in (items[:4], items[4:]):
        batch = collate_packed(group) if packed else collate(group)
        # Near the policy's own sums (~ -log VOCAB a token), so the sigmoids are not saturated.
        counts = pair_sums(batch, (batch["labels"] != -100).double())
        for key, count in zip(REF_KEYS, counts, strict=True):
            batch[key] = (-6.2 * count + torch.randn(2, generator=gen, dtype=torch.double)).float()
        micro.append(batch)
    return micro


def _rlvr_micro() -> list[dict]:
    gen = torch.Generator().manual_seed(4)
    items = examples(8)
    micro = []
    for i in (0, 4):
        batch = collate(items[i:i + 4])
        shape = batch["labels"].shape
        mask = (batch["labels"] != -100).float()
        batch["loss_mask"] = mask
        batch["old_logprobs"] = -6.5 - 0.2 * torch.rand(shape, generator=gen)
        batch["ref_logprobs"] = -6.5 - 0.2 * torch.rand(shape, generator=gen)
        batch["advantages"] = torch.randn(shape, generator=gen) * mask
        micro.append(batch)
    return micro


def _run(world: int, overrides: list[str]) -> list[dict]:
    setup = setup_layout(world, ["model.fused_logprobs=false", *overrides], global_batch=2)
    out = []
    for kind, loss, packed, fused in RUNS:
        if kind == "dpo":
            stage = DPOStage(setup.shard, loss, beta=0.5, fused=fused)
            micro = _dpo_micro(packed)
        else:
            stage = RLVRPolicyStage(setup.shard, loss, clip=0.2, kl_beta=0.05, fused=fused)
            micro = _rlvr_micro()
        out.append(gradients(setup, stage, micro))
    ps.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def runs() -> tuple[list[dict], list[list[dict]]]:
    single = run_distributed_test(_run, 1, 1, [])[0]
    cp2 = run_distributed_test(_run, 2, 2, ["parallel.cp=2"])
    return single, cp2


@pytest.mark.parametrize("index", range(len(RUNS)),
                         ids=[f"{k}-{n}{'-packed' if p else ''}{'-fused' if f else ''}"
                              for k, n, p, f in RUNS])
def test_cp2_equals_one_process(runs: tuple, index: int) -> None:
    single, cp2 = runs
    want = single[index]
    per_rank = [rank[index] for rank in cp2]
    for got in per_rank:
        assert abs(got["loss"][0] - want["loss"][0]) <= TOL * max(1.0, abs(want["loss"][0]))
    diff, where = max_diff(merge(per_rank, "grads"), merge([want], "grads"))
    assert diff <= TOL, f"gradient of {where} differs by {diff}"
    assert max(abs(g).max() for g in want["grads"].values()) > 100 * TOL  # gradients not all ~0
