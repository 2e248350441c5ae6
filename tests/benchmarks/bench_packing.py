"""Padding waste: pad-to-longest vs best-fit packing on a Tülu-like length mix.

    python tests/benchmarks/bench_packing.py [--examples 2048] [--max-len 4096] [--micro-batch 8]

Lengths are log-normal (median 600 tokens, sigma 1.0, clipped to [32, max_len]): many short chats
and a long tail, the shape of Tülu 3's SFT mixture. Three layouts of the same shuffled examples:

- pad: each micro-batch of ``micro_batch`` examples padded to its longest (``pack=False``)
- pack: the same micro-batches best-fit packed into rows of ``max_len`` (``pack=True``)
- plan: each global batch (``global_batch`` examples) planned into micro-batches of
  ``rows`` x ``max_len`` tokens (``plan_micro_batches``), then packed: fixed shapes

Prints a markdown table; exits 1 if packing does not cut padded tokens by >= 3x.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from tulu3.data.examples import SFTExample
from tulu3.data.packing import collate_sft, padding_stats, plan_micro_batches


def tulu_like_lengths(n: int, max_len: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(600), 1.0, n), 32, max_len).astype(int)


def _examples(lengths: np.ndarray, seed: int) -> list[SFTExample]:
    rng = np.random.default_rng(seed + 1)
    out = []
    for i, n in enumerate(lengths):
        ids = rng.integers(0, 1000, n).tolist()
        out.append(SFTExample(ids, ids, index=i))
    return out


def _measure(batches: list[list[SFTExample]], max_len: int, pack: bool) -> dict:
    totals = {"micro_batches": len(batches), "slots": 0, "real_tokens": 0, "padding_tokens": 0}
    start = time.perf_counter()
    for batch in batches:
        stats = padding_stats(collate_sft(batch, max_len, pack=pack))
        for key in ("slots", "real_tokens", "padding_tokens"):
            totals[key] += stats[key]
    totals["collate_ms"] = 1000 * (time.perf_counter() - start) / len(batches)
    return totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=2048)
    parser.add_argument("--max-len", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--global-batch", type=int, default=128)
    parser.add_argument("--rows", type=int, default=2, help="rows per planned micro-batch")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    lengths = tulu_like_lengths(args.examples, args.max_len, args.seed)
    examples = _examples(lengths, args.seed)
    mb = args.micro_batch
    micro = [examples[i:i + mb] for i in range(0, len(examples), mb)]
    results = {"pad to longest": _measure(micro, args.max_len, pack=False),
               "pack (same micro-batches)": _measure(micro, args.max_len, pack=True)}
    planned = []
    for g in range(0, len(examples), args.global_batch):
        chunk = examples[g:g + args.global_batch]
        plans = plan_micro_batches([len(e.input_ids) for e in chunk], args.max_len, args.rows)
        planned += [[chunk[i] for i in plan] for plan in plans]
    results[f"plan ({args.rows} x {args.max_len} per micro-batch)"] = \
        _measure(planned, args.max_len, pack=True)

    print(f"{args.examples} examples, lengths median {int(np.median(lengths))} mean "
          f"{int(lengths.mean())} p99 {int(np.percentile(lengths, 99))}, max_len {args.max_len}, "
          f"micro-batch {mb}\n")
    print("| layout | micro-batches | slots | padded tokens | padding % | collate ms/mb |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['micro_batches']} | {r['slots']} | {r['padding_tokens']} | "
              f"{100 * r['padding_tokens'] / r['slots']:.1f} | {r['collate_ms']:.2f} |")
    base = results["pad to longest"]["padding_tokens"]
    ratios = {name: base / max(r["padding_tokens"], 1) for name, r in results.items()}
    print("\n" + ", ".join(f"{name}: {ratio:.1f}x fewer padded tokens"
                           for name, ratio in list(ratios.items())[1:]))
    return 0 if ratios["pack (same micro-batches)"] >= 3 else 1


if __name__ == "__main__":
    sys.exit(main())
