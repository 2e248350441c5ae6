"""The reward model (Bradley-Terry on the scalar head) at context parallel 2 equals one process:
the step-1 loss and every gradient, the head's included (fp32, tiny Llama, 1e-5 as
tests/parallel).

Under CP each rank's scalar head scores only its two chunks of every row; the step all-gathers
the scores so that every rank reads each sequence's reward at its last token, wherever that
token lies, and keeps only its own slice's gradient. The last tokens of the harness's
sequences (6 to 16 tokens, not multiples of 2 x CP) fall in different chunks, so both CP ranks
own some rewards. Padded rows (one sequence each) and packed rows (several, as ``collate_dpo``
packs pairs for ``--stage rm``) are covered, with and without the margin and centering terms.
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

from tulu3.model.scalar_head import VALUE_HEAD
from tulu3.parallel.context import cp_positions
from tulu3.stages.rm.stage import RMStage
from tulu3.testing import run_distributed_test

pytestmark = pytest.mark.distributed

TOL = 1e-5  # as tests/parallel/test_cp_stages.py: fp32 re-association only
RUNS = [(False, 0.0, 0.0), (False, 0.3, 0.05), (True, 0.3, 0.05)]
"""(packed rows, rm.margin, rm.center_coef)."""
SEED = 25
"""Examples whose micro-batch widths (13, 15 padded; 31, 27 packed) are not multiples of
2 x CP and whose last tokens land on both CP ranks in every micro-batch (checked below)."""


def _rm_micro(packed: bool) -> list[dict]:
    """Two micro-batches of two pairs: sequences 2i / 2i + 1 of the harness's examples are pair
    i's chosen / rejected (``collate_dpo``'s order), padded one to a row or packed."""
    items = examples(8, seed=SEED)
    for position, item in enumerate(items):
        item["index"] = position // 2
    return [collate_packed(group) if packed else collate(group) for group in (items[:4], items[4:])]


def _run(world: int, overrides: list[str]) -> list[dict]:
    setup = setup_layout(world, ["model.fused_logprobs=false", *overrides], global_batch=2,
                         scalar_head=True)
    out = [gradients(setup, RMStage(margin, center), _rm_micro(packed))
           for packed, margin, center in RUNS]
    ps.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def runs() -> tuple[list[dict], list[list[dict]]]:
    single = run_distributed_test(_run, 1, 1, [])[0]
    cp2 = run_distributed_test(_run, 2, 2, ["parallel.cp=2"])
    return single, cp2


@pytest.mark.parametrize("packed", [False, True])
def test_rewards_are_read_on_both_cp_ranks(packed: bool) -> None:
    """The parity below is only a test of the score gather if the step has to pad the rows and
    each CP rank holds some sequence's last token (whose score is its reward)."""
    for batch in _rm_micro(packed):
        seq_ids = batch["seq_ids"]
        width = seq_ids.shape[1]
        assert width % 4, f"row width {width} divides by 2 x CP: the step's padding is not used"
        rank1 = set(cp_positions(width + -width % 4, 2, 1).tolist())
        last = [int(torch.nonzero(seq_ids == s)[:, 1].max()) for s in range(4)]
        assert {p in rank1 for p in last} == {False, True}, last


@pytest.mark.parametrize("index", range(len(RUNS)),
                         ids=[f"{'packed' if p else 'padded'}-margin{m}-center{c}"
                              for p, m, c in RUNS])
def test_rm_cp2_equals_one_process(runs: tuple, index: int) -> None:
    single, cp2 = runs
    want = single[index]
    per_rank = [rank[index] for rank in cp2]
    for got in per_rank:
        assert abs(got["loss"][0] - want["loss"][0]) <= TOL * max(1.0, abs(want["loss"][0]))
    got_grads, want_grads = merge(per_rank, "grads"), merge([want], "grads")
    diff, where = max_diff(got_grads, want_grads)
    assert diff <= TOL, f"gradient of {where} differs by {diff}"
    assert float(want_grads[VALUE_HEAD].abs().max()) > 100 * TOL  # the head learns
    assert max(float(g.abs().max()) for g in want_grads.values()) > 100 * TOL
