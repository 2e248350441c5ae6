"""Micro-batches: padding or best-fit packing of SFT / DPO sequences, masks and THD metadata.

The trainer consumes exactly this dict (b rows, s tokens per row):

- ``tokens``       int64 [b, s]  input ids; padding is ``pad_id``
- ``labels``       int64 [b, s]  ALREADY SHIFTED: labels[:, t] is the target after tokens[:, t];
                                  -100 where not trained, at each document's last token, and padding
- ``position_ids`` int64 [b, s]  0, 1, ... restarting at every packed document (0 on padding)
- ``seq_ids``      int64 [b, s]  which sequence a token belongs to, 0..num_seqs-1 over the whole
                                  micro-batch; -1 on padding. Attend only to earlier, same seq_id.
- ``example_ids``  int64 [num_seqs]  dataset index of each sequence. DPO: sequence 2i is pair i's
                                  chosen, 2i+1 its rejected, both with the pair's index.

Unpacked: one sequence per row, rows padded to the longest. Packed: best-fit decreasing into rows of
``max_len`` (a document never straddles rows). Either way ``s`` is the longest row rounded up to
``pad_to_multiple`` unless ``pad_to`` fixes it (pipeline parallelism wants a fixed shape).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np
import torch

from tulu3.data.examples import IGNORE, DPOExample, SFTExample

Seq = tuple[Sequence[int], Sequence[int]]  # (ids, aligned labels)


def best_fit_pack(lengths: Sequence[int], max_len: int) -> list[list[int]]:
    """Best-fit decreasing: rows of indices into ``lengths``, each row's total <= ``max_len``.

    Deterministic (stable sort; ties go to the earliest row), O(n log n + n * rows) with bisect.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining space, row), kept sorted
    for i in order:
        n = int(lengths[i])
        if n > max_len:
            raise ValueError(f"sequence {i} has {n} tokens > max_len {max_len}: truncate first")
        at = bisect.bisect_left(free, (n, -1))
        if at == len(free):
            rows.append([i])
            bisect.insort(free, (max_len - n, len(rows) - 1))
            continue
        space, row = free.pop(at)
        rows[row].append(i)
        bisect.insort(free, (space - n, row))
    return rows


def plan_micro_batches(lengths: Sequence[int | Sequence[int]], max_len: int,
                       rows_per_micro_batch: int = 1) -> list[list[int]]:
    """Split items into micro-batches that each pack into ``rows_per_micro_batch`` rows of
    ``max_len`` tokens (a token budget of rows x max_len per micro-batch).

    ``lengths[i]`` is an int, or a tuple of lengths that must share a micro-batch (a DPO pair's
    chosen and rejected). Longest first, first fit over the open micro-batches; each is checked with
    :func:`best_fit_pack` on its sequences in the returned order, which is exactly what
    ``collate_*(..., pack=True)`` runs, so collating a planned micro-batch needs at most that many
    rows. Meant for one step's items (hundreds), not a whole dataset at once.
    """
    items = [(length,) if isinstance(length, (int, np.integer)) else tuple(length)
             for length in lengths]
    order = sorted(range(len(items)), key=lambda i: -sum(items[i]))
    budget = rows_per_micro_batch * max_len
    plans: list[list[int]] = []
    used: list[int] = []  # tokens per plan: a cheap bound before the exact packing check
    for i in order:
        size = sum(items[i])
        for k, plan in enumerate(plans):
            if used[k] + size > budget:
                continue
            seqs = [n for j in plan + [i] for n in items[j]]
            if len(best_fit_pack(seqs, max_len)) <= rows_per_micro_batch:
                plan.append(i)
                used[k] += size
                break
        else:
            if len(best_fit_pack(items[i], max_len)) > rows_per_micro_batch:
                raise ValueError(f"item {i} ({items[i]} tokens) does not fit in "
                                 f"{rows_per_micro_batch} rows of {max_len}")
            plans.append([i])
            used.append(size)
    return plans


def sft_sequences(examples: Sequence[SFTExample]) -> list[Seq]:
    return [(ex.input_ids, ex.labels) for ex in examples]


def dpo_sequences(pairs: Sequence[DPOExample]) -> list[Seq]:
    """Two sequences per pair, chosen then rejected: prompt + reply, the prompt masked."""
    seqs: list[Seq] = []
    for pair in pairs:
        masked = [IGNORE] * len(pair.prompt_ids)
        for reply in (pair.chosen_ids, pair.rejected_ids):
            seqs.append((list(pair.prompt_ids) + list(reply), masked + list(reply)))
    return seqs


def collate_sft(examples: Sequence[SFTExample], max_len: int, pack: bool, pad_id: int = 0,
                pad_to_multiple: int = 1, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """SFT examples -> micro-batch dict (see module docstring)."""
    ids = [ex.index for ex in examples]
    return collate_sequences(sft_sequences(examples), ids, max_len, pack, pad_id, pad_to_multiple,
                             pad_to)


def collate_dpo(pairs: Sequence[DPOExample], max_len: int, pack: bool, pad_id: int = 0,
                pad_to_multiple: int = 1, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """DPO pairs -> micro-batch dict with sequences 2i (chosen) and 2i+1 (rejected) of pair i."""
    ids = [pair.index for pair in pairs for _ in range(2)]
    return collate_sequences(dpo_sequences(pairs), ids, max_len, pack, pad_id, pad_to_multiple,
                             pad_to)


def collate_sequences(seqs: Sequence[Seq], example_ids: Sequence[int], max_len: int, pack: bool,
                      pad_id: int = 0, pad_to_multiple: int = 1,
                      pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Lay sequences out in rows (one each, or best-fit packed) and shift the labels."""
    lengths = [len(ids) for ids, _ in seqs]
    if not seqs:
        raise ValueError("cannot collate an empty micro-batch")
    if pack:
        layout = best_fit_pack(lengths, max_len)
    else:
        if max(lengths) > max_len:
            raise ValueError(f"sequence of {max(lengths)} tokens > max_len {max_len}")
        layout = [[i] for i in range(len(seqs))]
    longest = max(sum(lengths[i] for i in row) for row in layout)
    width = -(-longest // pad_to_multiple) * pad_to_multiple
    if pad_to is not None:
        if pad_to < longest:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest row ({longest})")
        width = pad_to
    shape = (len(layout), width)
    tokens = np.full(shape, pad_id, dtype=np.int64)
    labels = np.full(shape, IGNORE, dtype=np.int64)
    positions = np.zeros(shape, dtype=np.int64)
    seq_ids = np.full(shape, -1, dtype=np.int64)
    for r, row in enumerate(layout):
        start = 0
        for i in row:
            ids, aligned = seqs[i]
            n = lengths[i]
            tokens[r, start:start + n] = ids
            labels[r, start:start + n - 1] = aligned[1:]  # next-token targets; last one has none
            positions[r, start:start + n] = np.arange(n)
            seq_ids[r, start:start + n] = i
            start += n
    return {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(positions), "seq_ids": torch.from_numpy(seq_ids),
            "example_ids": torch.as_tensor(list(example_ids), dtype=torch.int64)}


def document_attention_mask(seq_ids: torch.Tensor) -> torch.Tensor:
    """Bool [b, 1, s, s] from seq_ids [b, s]; True = masked OUT (megatron's convention).

    Causal and same-document. Padding (-1) attends to earlier padding of its row, never to a
    document, so no query row is fully masked (a fully masked row makes softmax NaN, and NaN
    values times zero weights would leak into real tokens of later layers).
    """
    s = seq_ids.shape[-1]
    same = seq_ids[:, :, None] == seq_ids[:, None, :]
    causal = torch.ones(s, s, dtype=torch.bool, device=seq_ids.device).tril()
    return ~(same & causal)[:, None]


def cu_seqlens(seq_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """THD metadata for the micro-batch flattened to [b * s]: (int32 [n + 1] cumulative segment
    starts, max segment length). Segments are documents and each row's trailing padding, so the
    offsets cover every token (Transformer Engine's ``cu_seqlens`` for ``qkv_format="thd"``)."""
    b, s = seq_ids.shape
    flat = seq_ids.reshape(-1)
    new = torch.ones_like(flat, dtype=torch.bool)
    new[1:] = flat[1:] != flat[:-1]
    new[::s] = True  # a segment never crosses a row boundary
    starts = torch.nonzero(new).flatten()
    bounds = torch.cat([starts, torch.tensor([b * s], device=flat.device)])
    return bounds.to(torch.int32), int((bounds[1:] - bounds[:-1]).max())


def packed_seq_params(seq_ids: torch.Tensor, qkv_format: str = "thd"):
    """megatron ``PackedSeqParams`` of a micro-batch: cu_seqlens over its [b * s] tokens.

    ``thd`` (Transformer Engine, as Megatron-LM feeds it): the model sees tokens as [1, b * s],
    ``max_seqlen_*`` is the longest segment. ``sbhd`` (the torch spec's attention): activations
    stay [s, b], and ``max_seqlen_*`` is the row length ``s`` (megatron sizes its RoPE table by
    it; tulu3's model rotates by position_ids).
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    if qkv_format not in ("thd", "sbhd"):
        raise ValueError(f"qkv_format {qkv_format!r}: thd or sbhd")
    bounds, longest = cu_seqlens(seq_ids)
    if qkv_format == "sbhd":
        return PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=bounds, cu_seqlens_kv=bounds,
                               max_seqlen_q=seq_ids.shape[-1], max_seqlen_kv=seq_ids.shape[-1])
    # As Megatron-Bridge's get_packed_seq_params without unpadded lengths: the offsets cover
    # every token (padding is a segment of its own), and the padded offsets are the same.
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=bounds, cu_seqlens_kv=bounds,
                           cu_seqlens_q_padded=bounds, cu_seqlens_kv_padded=bounds,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def has_packed_rows(seq_ids: torch.Tensor) -> bool:
    """Whether any row of the micro-batch holds more than one document (padding, id -1, at a
    row's end does not count: causal attention never reaches it from a document)."""
    return not bool(((seq_ids == seq_ids[:, :1]) | (seq_ids < 0)).all())


def padding_stats(batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Token accounting of one micro-batch: slots, real tokens, padding, trained targets."""
    slots = batch["seq_ids"].numel()
    real = int((batch["seq_ids"] >= 0).sum())
    return {"slots": slots, "real_tokens": real, "padding_tokens": slots - real,
            "padding_frac": (slots - real) / max(slots, 1),
            "trained_tokens": int((batch["labels"] != IGNORE).sum())}
