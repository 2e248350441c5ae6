"""DPOStage on one process: sums per sequence (padded or packed), the loss and metrics against a
direct computation from full logits, fused == logits path, WPO's weight, and bad micro-batches.

Model outputs are random logits ``[b, s, v]`` (or hidden states and an output weight for the
fused path); the oracle gathers ``log_softmax`` over the whole vocabulary, which the stage never
does.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from tulu3.data.cache import Ragged
from tulu3.data.dataset import DPODataset
from tulu3.data.examples import DPOExample
from tulu3.data.packing import collate_dpo
from tulu3.stages.dpo.losses import LOSSES
from tulu3.stages.dpo.stage import REF_KEYS, DPOStage, ReferenceLogps, pair_logps
from tulu3.stages.logprobs import VocabShard

VOCAB = 37
SHARD = VocabShard(None, 0, VOCAB)


def _pairs(n: int = 5, seed: int = 0) -> list[DPOExample]:
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(2, 6))]
        chosen = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 7))]
        rejected = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 7))]
        pairs.append(DPOExample(prompt, chosen, rejected, index=10 + i))
    return pairs


def _logits(batch: dict, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    b, s = batch["tokens"].shape
    return torch.randn(b, s, VOCAB, generator=gen, dtype=torch.float64).float()


def _oracle_sums(batch: dict, logits: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Per-sequence sums of log_softmax(scale * logits)[label], by plain loops."""
    full = torch.log_softmax(scale * logits.double(), dim=-1)
    n = batch["example_ids"].numel()
    sums = torch.zeros(n, dtype=torch.float64)
    for r, s in zip(*torch.nonzero(batch["labels"] != -100, as_tuple=True), strict=True):
        sums[batch["seq_ids"][r, s]] += full[r, s, batch["labels"][r, s]]
    return sums


def _with_reference(batch: dict, chosen: torch.Tensor, rejected: torch.Tensor) -> dict:
    return {**batch, REF_KEYS[0]: chosen.float(), REF_KEYS[1]: rejected.float()}


@pytest.mark.parametrize("pack", [False, True])
def test_pair_sums_padded_and_packed(pack: bool) -> None:
    """Per-token values f(label) summed per sequence: each response's own sum, either layout."""
    pairs = _pairs()
    batch = collate_dpo(pairs, max_len=32, pack=pack)
    values = torch.where(batch["labels"] != -100, -0.01 * batch["labels"] - 0.1,
                         torch.zeros(()))
    sums = pair_logps(batch, values.float())
    for i, pair in enumerate(pairs):
        for got, reply, count in ((sums.chosen[i], pair.chosen_ids, sums.chosen_tokens[i]),
                                  (sums.rejected[i], pair.rejected_ids,
                                   sums.rejected_tokens[i])):
            want = sum(-0.01 * t - 0.1 for t in reply)
            assert abs(float(got) - want) < 1e-5
            assert int(count) == len(reply)


@pytest.mark.parametrize("loss", list(LOSSES))
def test_loss_and_metrics_match_full_softmax_oracle(loss: str) -> None:
    pairs = _pairs()
    batch = collate_dpo(pairs, max_len=64, pack=True)
    logits = _logits(batch)
    sums = _oracle_sums(batch, logits)
    ref_c, ref_r = sums[0::2] - 0.3 * torch.arange(5), sums[1::2] + 0.2
    stage = DPOStage(SHARD, loss, beta=0.7, gamma_beta_ratio=0.4, label_smoothing=0.0,
                     fused=False)
    loss_sum, normalizer, metrics = stage.loss(_with_reference(batch, ref_c, ref_r), logits,
                                               None)
    assert int(normalizer) == 5 and metrics["pairs"].tolist() == [5.0, 0.0]
    n_c = torch.tensor([len(p.chosen_ids) for p in pairs], dtype=torch.float64)
    n_r = torch.tensor([len(p.rejected_ids) for p in pairs], dtype=torch.float64)
    pc, pr = sums[0::2], sums[1::2]
    if loss in ("dpo_norm", "simpo"):
        pc, pr, ref_c, ref_r = pc / n_c, pr / n_r, ref_c / n_c, ref_r / n_r
    beta = 0.7
    if loss == "simpo":
        chosen_r, rejected_r = beta * pc, beta * pr
        per_pair = -torch.nn.functional.logsigmoid(beta * (pc - pr - 0.4))
    else:
        chosen_r, rejected_r = beta * (pc - ref_c), beta * (pr - ref_r)
        h = (pc - pr) - (ref_c - ref_r)
        per_pair = (h - 1 / (2 * beta)) ** 2 if loss == "ipo" else \
            -torch.nn.functional.logsigmoid(beta * h)
    if loss == "wpo":  # TRL's formula: mean over the response of log p - log sum_v p^2
        full = torch.log_softmax(logits.double(), dim=-1)
        adjust = torch.logsumexp(2 * full, dim=-1)  # log sum_v p_v^2 per position
        sharp = _oracle_sums(batch, logits) - _masked_sums(batch, adjust)
        weight = torch.clamp(torch.exp(sharp[0::2] / n_c + sharp[1::2] / n_r), max=1.0)
        per_pair = per_pair * weight
        assert abs(float(metrics["wpo/weight"][0]) - float(weight.sum())) < 1e-5
    assert abs(float(loss_sum) - float(per_pair.sum())) < 1e-4
    margin = chosen_r - rejected_r
    expect = {"rewards/chosen": chosen_r.sum(), "rewards/rejected": rejected_r.sum(),
              "rewards/margin": margin.sum(), "rewards/accuracy": (margin > 0).sum(),
              "logps/chosen": pc.sum(), "logps/rejected": pr.sum()}
    for name, value in expect.items():
        total, count = metrics[name].tolist()
        assert count == 5 and abs(total - float(value)) < 1e-4, (name, total, float(value))


def _masked_sums(batch: dict, per_position: torch.Tensor) -> torch.Tensor:
    n = batch["example_ids"].numel()
    sums = torch.zeros(n, dtype=torch.float64)
    for r, s in zip(*torch.nonzero(batch["labels"] != -100, as_tuple=True), strict=True):
        sums[batch["seq_ids"][r, s]] += per_position[r, s]
    return sums


class _Head(torch.nn.Module):
    """The fused path's view of a model: an output weight [v, h]."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight)

    def output_weight(self) -> torch.Tensor:
        return self.weight


@pytest.mark.parametrize("loss", ["dpo_norm", "wpo"])
def test_fused_path_equals_logits_path(loss: str) -> None:
    batch = collate_dpo(_pairs(), max_len=64, pack=False)
    b, s = batch["tokens"].shape
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(s, b, 16, generator=gen, requires_grad=True)
    head = _Head(torch.randn(VOCAB, 16, generator=gen) * 0.3)
    ref = torch.full((5,), -20.0)
    results = []
    for fused in (True, False):
        stage = DPOStage(SHARD, loss, beta=2.0, fused=fused)
        output = hidden if fused else (hidden.transpose(0, 1) @ head.weight.T)
        loss_sum, _, metrics = stage.loss(_with_reference(batch, ref, ref), output, head)
        grad, = torch.autograd.grad(loss_sum, hidden)
        results.append((loss_sum.item(), grad, metrics["rewards/margin"][0].item()))
    (fused_loss, fused_grad, fused_margin), (plain_loss, plain_grad, plain_margin) = results
    assert abs(fused_loss - plain_loss) < 1e-5 and abs(fused_margin - plain_margin) < 1e-5
    torch.testing.assert_close(fused_grad, plain_grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("loss", ["dpo", "dpo_norm"])
def test_policy_equal_to_reference_is_log2(loss: str) -> None:
    batch = collate_dpo(_pairs(), max_len=64, pack=True)
    logits = _logits(batch)
    keys, recorded = ReferenceLogps(SHARD, fused=False)(batch, logits, None)
    batch = _with_reference(batch, recorded[REF_KEYS[0]], recorded[REF_KEYS[1]])
    loss_sum, _, metrics = DPOStage(SHARD, loss, beta=5.0, fused=False).loss(batch, logits, None)
    assert keys.tolist() == [10, 11, 12, 13, 14]  # one key per pair: its example id
    assert abs(float(loss_sum) / 5 - math.log(2)) < 1e-7
    assert metrics["rewards/accuracy"].tolist() == [0.0, 5.0]  # ties are not wins


@pytest.mark.parametrize("loss", list(LOSSES))
def test_identical_chosen_and_rejected_have_zero_gradient(loss: str) -> None:
    """Why the loop drops such pairs: they teach nothing, whatever the loss."""
    pair = _pairs(1)[0]
    batch = collate_dpo([DPOExample(pair.prompt_ids, pair.chosen_ids, pair.chosen_ids, 3)],
                        max_len=64, pack=False)
    shared = _logits(batch)[:1].clone().requires_grad_()  # a model: same tokens, same logits
    logits = shared.expand(2, -1, -1)
    batch = _with_reference(batch, torch.tensor([-4.0]), torch.tensor([-4.0]))
    loss_sum, _, _ = DPOStage(SHARD, loss, beta=1.0, fused=False).loss(batch, logits, None)
    grad, = torch.autograd.grad(loss_sum, shared)
    assert float(grad.abs().max()) < 1e-6
    if loss in ("dpo", "dpo_norm"):
        assert abs(float(loss_sum) - math.log(2)) < 1e-6


def test_bad_micro_batches_are_refused() -> None:
    stage = DPOStage(SHARD, "dpo", beta=1.0, fused=False)
    batch = collate_dpo(_pairs(2), max_len=64, pack=False)
    logits = _logits(batch)
    ref = torch.zeros(2)
    with pytest.raises(ValueError, match="no \\['ref_chosen_logps', 'ref_rejected_logps'\\]"):
        stage.loss(batch, logits, None)
    shuffled = {**_with_reference(batch, ref, ref),
                "example_ids": torch.tensor([10, 11, 10, 11])}
    with pytest.raises(ValueError, match="same example id"):
        stage.loss(shuffled, logits, None)
    empty = _with_reference(batch, ref, ref)
    empty["labels"] = empty["labels"].clone()
    empty["labels"][empty["seq_ids"] == 3] = -100  # pair 11's rejected response: no targets
    with pytest.raises(ValueError, match=r"pairs \[11\] have a response with no trained token"):
        stage.loss(empty, logits, None)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="dpo.loss"):
        DPOStage(SHARD, "kto")
    with pytest.raises(ValueError, match="label_smoothing does not apply"):
        DPOStage(SHARD, "ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="beta"):
        DPOStage(SHARD, "dpo", beta=0.0)
    assert not DPOStage(SHARD, "simpo").needs_reference


def test_pair_view_skips_identical_pairs() -> None:
    from tulu3.stages.dpo.loop import PairView

    prompt, chosen, rejected = [[1, 2], [3, 4], [5]], [[7, 8], [9], [6, 6]], [[7, 8], [9, 1], [6]]
    arrays = {}
    for name, rows in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        arrays.update(Ragged.from_lists(rows).arrays(name))
    view = PairView(DPODataset(arrays, {}), "train")
    assert view.skipped_identical == 1 and len(view) == 2
    assert [view[i].index for i in range(2)] == [1, 2]  # dataset indices, the cache's key
    np.testing.assert_array_equal(view.keep, [1, 2])


def test_bad_rows_from_file_to_trainable_pairs(tmp_path) -> None:
    """The whole path of bad input: different prompts and an empty response stop the data layer
    (file:line) or are skipped and counted with data.skip_bad_rows; identical chosen/rejected
    rows load and are then left out (and counted) by the loop's PairView."""
    import json

    from tulu3.data.dataset import build_dataset
    from tulu3.data.examples import RowError
    from tulu3.data.synthetic import tokenizer_corpus
    from tulu3.data.tokenizer import build_tiny_tiktoken, load_tokenizer
    from tulu3.stages.dpo.loop import PairView

    tok = load_tokenizer(build_tiny_tiktoken(str(tmp_path / "tok.model"), tokenizer_corpus(30),
                                             40))

    def row(prompt: str, chosen: str, rejected: str, rejected_prompt: str | None = None) -> str:
        def chat(p: str, reply: str) -> list[dict]:
            return [{"role": "user", "content": p}, {"role": "assistant", "content": reply}]

        return json.dumps({"chosen": chat(prompt, chosen),
                           "rejected": chat(rejected_prompt or prompt, rejected)})

    lines = [row("Count to 3.", "1 2 3", "1 3"),
             row("Count to 3.", "1 2 3", "1 3", rejected_prompt="Count to 4."),
             row("Count to 2.", "1 2", ""),
             row("Count to 2.", "1 2", "1 2"),
             row("Reverse these words: cat sun", "sun cat", "cat sun")]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(RowError, match=f"{path}:2: chosen and rejected have different prompts"):
        build_dataset("dpo", str(path), tok, max_len=64)
    dataset = build_dataset("dpo", str(path), tok, max_len=64, skip_bad_rows=True)
    assert len(dataset) == 3 and dataset.meta["stats"]["bad_rows"] == 2  # lines 2 and 3
    view = PairView(dataset, "train")
    assert len(view) == 2 and view.skipped_identical == 1
    assert [view[i].index for i in range(2)] == [0, 2]
