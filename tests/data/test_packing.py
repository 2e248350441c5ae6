"""Micro-batch layout: shifted labels, positions, seq_ids, masks; packed == unpacked losses."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from tulu3.data.examples import IGNORE, DPOExample, SFTExample
from tulu3.data.packing import (
    best_fit_pack,
    collate_dpo,
    collate_sft,
    cu_seqlens,
    document_attention_mask,
    packed_seq_params,
    padding_stats,
    plan_micro_batches,
)

VOCAB = 50


def _examples(n: int, seed: int = 0, max_len: int = 24) -> list[SFTExample]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(3, max_len)
        ids = [rng.randrange(VOCAB) for _ in range(length)]
        start = rng.randint(1, length - 1)  # a prompt, then trained tokens (some masked again)
        labels = [t if k >= start and rng.random() < 0.8 else IGNORE for k, t in enumerate(ids)]
        out.append(SFTExample(ids, labels, index=100 + i))
    return out


def _pairs(n: int, seed: int = 0) -> list[DPOExample]:
    rng = random.Random(seed)
    return [DPOExample([rng.randrange(VOCAB) for _ in range(rng.randint(1, 8))],
                       [rng.randrange(VOCAB) for _ in range(rng.randint(1, 10))],
                       [rng.randrange(VOCAB) for _ in range(rng.randint(1, 10))], index=7 * i)
            for i in range(n)]


def _check_layout(batch, seqs, example_ids):
    """Every sequence appears once, contiguous, with restarting positions and shifted labels."""
    assert batch["example_ids"].tolist() == example_ids
    for i, (ids, aligned) in enumerate(seqs):
        where = (batch["seq_ids"] == i).nonzero()
        assert len(where) == len(ids)
        row, cols = where[0, 0], where[:, 1]
        assert (where[:, 0] == row).all() and (cols == cols[0] + torch.arange(len(ids))).all()
        assert batch["tokens"][row, cols].tolist() == list(ids)
        assert batch["position_ids"][row, cols].tolist() == list(range(len(ids)))
        assert batch["labels"][row, cols].tolist() == list(aligned[1:]) + [IGNORE]
    padding = batch["seq_ids"] < 0
    assert (batch["labels"][padding] == IGNORE).all()


@pytest.mark.parametrize("pack", [False, True])
def test_collate_sft_layout(pack):
    examples = _examples(9)
    batch = collate_sft(examples, max_len=32, pack=pack)
    lengths = [len(ex.input_ids) for ex in examples]
    assert set(batch) == {"tokens", "labels", "position_ids", "seq_ids", "example_ids"}
    assert all(v.dtype == torch.int64 for v in batch.values())
    if pack:
        assert batch["tokens"].shape[0] < len(examples)
        assert batch["tokens"].shape[0] >= -(-sum(lengths) // 32)
    else:
        assert batch["tokens"].shape == (9, max(lengths))
    _check_layout(batch, [(e.input_ids, e.labels) for e in examples], [e.index for e in examples])


@pytest.mark.parametrize("pack", [False, True])
def test_collate_dpo_pairs(pack):
    pairs = _pairs(5)
    batch = collate_dpo(pairs, max_len=24, pack=pack)
    seqs = []
    for p in pairs:
        for reply in (p.chosen_ids, p.rejected_ids):
            seqs.append((p.prompt_ids + reply, [IGNORE] * len(p.prompt_ids) + reply))
    _check_layout(batch, seqs, [p.index for p in pairs for _ in range(2)])
    for i, p in enumerate(pairs):  # sequence 2i is chosen, 2i+1 rejected; only replies trained
        for k, reply in ((2 * i, p.chosen_ids), (2 * i + 1, p.rejected_ids)):
            trained = batch["labels"][(batch["seq_ids"] == k) & (batch["labels"] != IGNORE)]
            assert trained.tolist() == reply


def test_padding_options_and_errors():
    examples = _examples(4)
    batch = collate_sft(examples, max_len=32, pack=False, pad_to_multiple=8, pad_id=3)
    assert batch["tokens"].shape[1] % 8 == 0 and (batch["tokens"][batch["seq_ids"] < 0] == 3).all()
    assert collate_sft(examples, max_len=32, pack=True, pad_to=40)["tokens"].shape[1] == 40
    with pytest.raises(ValueError, match="max_len"):
        collate_sft(examples, max_len=5, pack=False)
    with pytest.raises(ValueError, match="max_len"):
        collate_sft(examples, max_len=5, pack=True)


def test_document_mask_and_cu_seqlens():
    seq_ids = torch.tensor([[0, 0, 2, 2, 2, -1], [1, 1, 1, 1, -1, -1]])
    mask = document_attention_mask(seq_ids)
    assert mask.shape == (2, 1, 6, 6) and mask.dtype == torch.bool
    allowed = ~mask[0, 0]
    assert allowed[3].tolist() == [False, False, True, True, False, False]  # own doc, causal
    assert allowed[1].tolist() == [True, True, False, False, False, False]
    assert allowed[5].tolist() == [False] * 5 + [True]  # padding sees only padding
    assert (~mask).any(-1).all()  # no fully masked query row (softmax would give NaN)
    bounds, longest = cu_seqlens(seq_ids)
    assert bounds.dtype == torch.int32
    assert bounds.tolist() == [0, 2, 5, 6, 10, 12] and longest == 4


def test_packed_seq_params_for_thd(monkeypatch):
    # megatron-core's own PackedSeqParams, loaded from its file: importing megatron.core takes
    # 5-20 s on these CPUs, and this test only needs the dataclass's field names.
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(importlib.util.find_spec("megatron").submodule_search_locations[0])
    spec = importlib.util.spec_from_file_location("megatron.core.packed_seq_params",
                                                  root / "core" / "packed_seq_params.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "megatron.core.packed_seq_params", module)
    params = packed_seq_params(torch.tensor([[0, 0, 1, -1]]))
    assert type(params).__name__ == "PackedSeqParams"
    assert params.qkv_format == "thd" and params.cu_seqlens_q.tolist() == [0, 2, 3, 4]
    assert params.max_seqlen_kv == 2


def test_best_fit_pack():
    lengths = [7, 5, 4, 3, 3, 2, 1, 1]  # 26 tokens: fits exactly in 3 rows of 9 minus one slot
    rows = best_fit_pack(lengths, 9)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 9 for row in rows) and len(rows) == 3
    assert best_fit_pack(lengths, 9) == rows
    with pytest.raises(ValueError, match="truncate"):
        best_fit_pack([10], 9)


def test_planner_micro_batches_collate_within_budget():
    rng = random.Random(1)
    examples = _examples(40, seed=3, max_len=30)
    plans = plan_micro_batches([len(e.input_ids) for e in examples], 32, rows_per_micro_batch=2)
    assert sorted(i for plan in plans for i in plan) == list(range(40))
    for plan in plans:
        batch = collate_sft([examples[i] for i in plan], 32, pack=True)
        assert batch["tokens"].shape[0] <= 2
    pairs = _pairs(12, seed=rng.randint(0, 99))
    lengths = [(len(p.prompt_ids) + len(p.chosen_ids), len(p.prompt_ids) + len(p.rejected_ids))
               for p in pairs]
    dpo_plans = plan_micro_batches(lengths, 24, rows_per_micro_batch=2)
    assert sorted(i for plan in dpo_plans for i in plan) == list(range(12))
    assert len(dpo_plans) < len(pairs)
    for plan in dpo_plans:
        assert collate_dpo([pairs[i] for i in plan], 24, pack=True)["tokens"].shape[0] <= 2
    with pytest.raises(ValueError, match="does not fit"):
        plan_micro_batches([(20, 20)], 24, rows_per_micro_batch=1)


def test_padding_stats():
    batch = collate_sft(_examples(6), max_len=64, pack=True)
    stats = padding_stats(batch)
    real = sum(len(e.input_ids) for e in _examples(6))
    assert stats["real_tokens"] == real
    assert stats["padding_tokens"] == batch["tokens"].numel() - real
    assert stats["trained_tokens"] == int((batch["labels"] != IGNORE).sum())


class TinyCausalLM(torch.nn.Module):
    """Two attention + MLP blocks with ABSOLUTE learned positions (indexed by position_ids):
    unlike RoPE, they make a wrong position id change the loss, so the test checks positions too."""

    def __init__(self, dim: int = 16, heads: int = 2, layers: int = 2):
        super().__init__()
        self.heads = heads
        self.embed = torch.nn.Embedding(VOCAB, dim)
        self.pos = torch.nn.Embedding(64, dim)
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(dim, 3 * dim) for _ in range(layers))
        self.mlp = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(layers))
        self.head = torch.nn.Linear(dim, VOCAB)

    def forward(self, tokens, position_ids, masked_out):
        x = self.embed(tokens) + self.pos(position_ids)
        b, s, d = x.shape
        for qkv, mlp in zip(self.qkv, self.mlp):
            q, k, v = qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=~masked_out)
            x = x + att.transpose(1, 2).reshape(b, s, d)
            x = x + torch.tanh(mlp(x))
        return self.head(x)


def _token_losses(model, batch, mask=None, positions=None) -> dict[tuple[int, int], float]:
    mask = document_attention_mask(batch["seq_ids"]) if mask is None else mask
    positions = batch["position_ids"] if positions is None else positions
    logits = model(batch["tokens"], positions, mask)
    loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none",
                           ignore_index=IGNORE).view(batch["labels"].shape)
    keep = batch["labels"] != IGNORE
    return {(int(sid), int(pos)): float(value) for sid, pos, value in
            zip(batch["seq_ids"][keep], batch["position_ids"][keep], loss[keep])}


def _assert_close(a: dict, b: dict, tol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    worst = max(abs(a[k] - b[k]) for k in a)
    assert worst < tol, worst


@torch.no_grad()
def test_packed_equals_unpacked_per_token_loss():
    torch.manual_seed(0)
    model = TinyCausalLM().double()
    examples = _examples(12, seed=5)
    unpacked = _token_losses(model, collate_sft(examples, 48, pack=False))
    packed_batch = collate_sft(examples, 48, pack=True)
    assert packed_batch["tokens"].shape[0] < len(examples)
    packed = _token_losses(model, packed_batch)
    assert len(packed) == sum(1 for e in examples for t in e.labels[1:] if t != IGNORE)
    _assert_close(packed, unpacked)
    # The same comparison must fail without document isolation or without restarting positions.
    plain_causal = ~torch.ones(packed_batch["tokens"].shape[1],
                               packed_batch["tokens"].shape[1], dtype=torch.bool).tril()
    leaky = _token_losses(model, packed_batch, mask=plain_causal.expand(
        packed_batch["tokens"].shape[0], 1, -1, -1))
    with pytest.raises(AssertionError):
        _assert_close(leaky, unpacked)
    arange = torch.arange(packed_batch["tokens"].shape[1]).expand_as(packed_batch["tokens"])
    with pytest.raises(AssertionError):
        _assert_close(_token_losses(model, packed_batch, positions=arange), unpacked)


@torch.no_grad()
def test_packed_equals_unpacked_dpo_sequence_logps():
    torch.manual_seed(1)
    model = TinyCausalLM().double()
    pairs = _pairs(6, seed=2)
    a = _token_losses(model, collate_dpo(pairs, 24, pack=False))
    b = _token_losses(model, collate_dpo(pairs, 24, pack=True))
    _assert_close(a, b)


def test_packing_benchmark_keeps_its_3x_claim(capsys):
    """The figure in docs/PERFORMANCE.md, at a smaller size: packing pads >= 3x fewer tokens."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "bench_packing.py"
    spec = importlib.util.spec_from_file_location("bench_packing", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--examples", "256", "--global-batch", "64"]) == 0
    assert "fewer padded tokens" in capsys.readouterr().out
