"""Attention on one packed row: dense [s, s] document mask vs FlexAttention vs documents alone.

    python tests/benchmarks/bench_attention.py [--seq 4096] [--docs 8] [--heads 8] [--kv-heads 2]
                                               [--head-dim 64] [--device cpu|cuda] [--repeat 3]

One row of ``seq`` tokens holding ``docs`` documents of random lengths (the same tokens for every
method), the heads of one TP rank, GQA. Methods (each checked against the first one's output):

- ``dense``: SDPA with the [1, 1, s, s] boolean document-causal mask (tulu3's CPU path: the
  torch spec's mask function evaluated densely, tulu3/model/attention.py ``dense_mask``);
- ``flex``: FlexAttention with the BlockMask of the same mask function (tulu3's CUDA path;
  compiled on CUDA). On CPU forward only: torch 2.13 has no FlexAttention backward on CPU;
- ``unpacked``: every document on its own with SDPA ``is_causal`` (flash on GPU): the floor.

Prints a markdown table: milliseconds to build each mask (once per micro-batch in the model, then
shared by every layer), then per attention call, forward and forward + backward where it runs,
with the peak memory of the call above what was held before it (CUDA allocator; on CPU the
resident set's high-water mark, kernels/memory.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kernels.memory import peak_bytes, pin_malloc_mmap_threshold, start_peak_window
from tulu3.data.packing import packed_seq_params
from tulu3.model.attention import (
    block_mask,
    dense_mask,
    document_ids,
    document_mask_mod,
    flex_attention,
)


def make_row(seq: int, docs: int, seed: int) -> torch.Tensor:
    """seq_ids [1, seq]: ``docs`` documents of random lengths that fill the row."""
    gen = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(seq - 1, generator=gen)[:docs - 1].add(1).sort().values
    lengths = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([seq])]))
    return torch.repeat_interleave(torch.arange(docs), lengths)[None]


def methods(seq_ids: torch.Tensor) -> dict[str, tuple[Callable, Callable]]:
    """name -> (build the micro-batch's mask, attention given that mask)."""
    seq = seq_ids.shape[1]
    pos = torch.arange(seq, device=seq_ids.device)
    docs = document_ids(packed_seq_params(seq_ids.cpu(), "sbhd"), 1, seq).to(seq_ids.device)
    mask_mod = document_mask_mod(docs, pos, pos)

    def dense(q, k, v, allowed):  # noqa: ANN001, ANN202
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)

    def flex(q, k, v, mask):  # noqa: ANN001, ANN202
        return flex_attention(q, k, v, mask, None)

    def unpacked(q, k, v, _):  # noqa: ANN001, ANN202
        outs = [F.scaled_dot_product_attention(q[:, :, at], k[:, :, at], v[:, :, at],
                                               is_causal=True, enable_gqa=True)
                for at in (seq_ids[0] == d for d in seq_ids[0].unique())]
        return torch.cat(outs, dim=2)

    device = seq_ids.device
    return {"dense": (lambda: dense_mask(mask_mod, 1, seq, seq, device), dense),
            "flex": (lambda: block_mask(mask_mod, 1, seq, seq, device), flex),
            "unpacked": (lambda: None, unpacked)}


def measure(fn: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backward: bool,
            repeat: int) -> tuple[float, int, torch.Tensor]:
    """(ms per call, peak bytes above the start, output) of the fastest of ``repeat`` calls."""
    best, peak, out = float("inf"), 0, None
    for _ in range(repeat + 1):  # the first call warms up (and compiles flex on CUDA)
        for t in (q, k, v):
            t.grad = None
        base = start_peak_window(q.device)
        start = time.perf_counter()
        out = fn(q, k, v)
        if backward:
            out.sum().backward()
        if q.is_cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        peak = max(peak, peak_bytes(q.device) - base)
        best = min(best, elapsed)
    return best * 1e3, peak, out.detach()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--docs", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) | bfloat16")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--forward-only", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if device.type == "cpu":
        pin_malloc_mmap_threshold()
    seq_ids = make_row(args.seq, args.docs, seed=0).to(device)
    gen = torch.Generator().manual_seed(1)
    shapes = [(1, args.heads, args.seq, args.head_dim)] + [(1, args.kv_heads, args.seq,
                                                             args.head_dim)] * 2
    q, k, v = (torch.randn(*s, generator=gen).to(device, dtype).requires_grad_()
               for s in shapes)
    print(f"one row of {args.seq} tokens, {args.docs} documents, {args.heads} heads "
          f"({args.kv_heads} KV), head dim {args.head_dim}, {dtype}, {device.type}\n")
    print("| method | pass | ms | peak MiB above start | max abs diff vs dense |")
    print("|---|---|---|---|---|")
    reference, masks = None, {}
    for name, (build, _) in methods(seq_ids).items():
        start = time.perf_counter()
        masks[name] = build()
        print(f"| {name} | mask (once per micro-batch) | "
              f"{(time.perf_counter() - start) * 1e3:.1f} | - | - |")
    for backward in (False, True) if not args.forward_only else (False,):
        for name, (_, attend) in methods(seq_ids).items():
            if backward and name == "flex" and device.type == "cpu":
                continue  # torch 2.13: "FlexAttention does not support backward on CPU"
            inputs = (q, k, v) if backward else (q.detach(), k.detach(), v.detach())
            with torch.set_grad_enabled(backward):
                ms, peak, out = measure(lambda a, b, c, n=name, f=attend: f(a, b, c, masks[n]),
                                        *inputs, backward, args.repeat)
            reference = out if reference is None else reference
            diff = float((out.float() - reference.float()).abs().max())
            print(f"| {name} | {'fwd + bwd' if backward else 'fwd'} | {ms:.1f} | "
                  f"{peak / 2**20:.1f} | {diff:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
