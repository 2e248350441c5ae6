"""SFT loss reductions by hand, and what a NaN loss does to a training step."""

from __future__ import annotations

import math

import pytest
import torch

from tulu3.parallel.groups import ProcessGroups
from tulu3.stages.logprobs import VocabShard
from tulu3.stages.sft import SFTStage

LN2, LN4 = math.log(2), math.log(4)


def _micro_batch(labels: list[int], target_logit: float) -> tuple[dict, torch.Tensor]:
    """One sequence; vocab 4; the label token gets ``target_logit``, the others 0."""
    seq = len(labels)
    logits = torch.zeros(1, seq, 4)
    for t, label in enumerate(labels):
        if label >= 0:
            logits[0, t, label] = target_logit
    batch = {"labels": torch.tensor([labels]), "seq_ids": torch.zeros(1, seq, dtype=torch.long),
             "example_ids": torch.tensor([0])}
    return batch, logits


def _combined(reduction: str) -> tuple[float, dict]:
    """Two micro-batches as megatron combines them: sum of loss sums / sum of normalizers."""
    stage = SFTStage(VocabShard(None, 0, 4), reduction, fused=False)
    # A: 3 trained tokens at uniform logits -> ln 4 each. B: 1 token with p = 3/6 -> ln 2.
    a = stage.loss(*_micro_batch([1, 2, 3, -100], 0.0), model=None)
    b = stage.loss(*_micro_batch([-100, 0], math.log(3)), model=None)
    total = (a[0] + b[0]) / (a[1] + b[1])
    metrics = {k: a[2][k] + b[2][k] for k in a[2]}
    return float(total), metrics


def test_sum_reduction_divides_by_sequences() -> None:
    loss, metrics = _combined("sum")
    assert loss == pytest.approx((3 * LN4 + LN2) / 2, abs=1e-6)  # 2.426015
    total, count = metrics["loss"].tolist()
    assert total / count == pytest.approx(2.426015, abs=1e-6)


def test_mean_reduction_divides_by_tokens() -> None:
    loss, metrics = _combined("mean")
    assert loss == pytest.approx((3 * LN4 + LN2) / 4, abs=1e-6)  # 1.213008
    assert metrics["trained_tokens"][0] == 4
    total, count = metrics["token_loss"].tolist()
    assert total / count == pytest.approx(1.213008, abs=1e-6)


def test_unknown_reduction_is_refused() -> None:
    with pytest.raises(ValueError, match="sft.loss_reduction"):
        SFTStage(VocabShard(None, 0, 4), "median")


def _nan_step(skip: bool) -> dict:
    """One real training step whose loss is NaN on the second micro-batch."""
    from megatron.core import parallel_state as ps
    from parity_harness import VOCAB, collate, examples

    from tulu3.config import load_config
    from tulu3.model.build import build_model_chunks
    from tulu3.optim import build_optimizer
    from tulu3.parallel.ddp import wrap_ddp
    from tulu3.parallel.init import init_model_parallel
    from tulu3.parallel.layout import make_layout
    from tulu3.step import NonFiniteLoss, train_step

    cfg = load_config(None, [f"model.vocab={VOCAB}", "train.global_batch=2"])
    layout = make_layout(cfg, 1)
    init_model_parallel(layout, seed=1)
    ddp = wrap_ddp(build_model_chunks(cfg.model, layout, ProcessGroups.current()), layout)
    optimizer, scheduler = build_optimizer(cfg, ddp, total_steps=4)
    stage = SFTStage(VocabShard(ps.get_tensor_model_parallel_group(), 0, VOCAB), fused=False)
    original = stage.loss

    def poisoned(batch: dict, output: torch.Tensor, model: torch.nn.Module):
        loss_sum, normalizer, metrics = original(batch, output, model)
        if int(batch["example_ids"][0]) == 1:
            loss_sum = loss_sum * float("nan")
        return loss_sum, normalizer, metrics

    stage.loss = poisoned
    before = [p.detach().clone() for p in ddp[0].parameters()]
    micro = [collate([item]) for item in examples(2)]
    try:
        metrics = train_step(ddp, optimizer, scheduler, micro, stage, layout, step=7,
                             skip_nonfinite=skip)
    except NonFiniteLoss as err:
        return {"error": str(err)}
    changed = any(not torch.equal(a, b) for a, b in zip(before, ddp[0].parameters()))
    return {"metrics": metrics, "changed": changed}


def test_nan_loss_stops_with_step_micro_batch_and_rank() -> None:
    from tulu3.testing import run_distributed_test

    stopped, skipped = run_distributed_test(_nan_step, 1, False)[0], None
    assert "step 7" in stopped["error"] and "micro-batch" in stopped["error"]
    assert "examples [1]" in stopped["error"] and "rank 0" in stopped["error"]
    skipped = run_distributed_test(_nan_step, 1, True)[0]
    assert skipped["metrics"]["skipped"] is True and skipped["changed"] is False
