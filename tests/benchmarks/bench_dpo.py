"""DPO reference modes: peak memory and tokens/s of ``cached`` vs ``online`` on one machine.

    python tests/benchmarks/bench_dpo.py [--world 1] [--steps 12] [--pairs 256] \\
        [--set model.hidden=512 model.layers=8 ...]

Each mode runs in fresh processes (``--world`` gloo ranks on CPU, forked): the tiny synthetic
preference set (``tulu3.demo.data``, ``--pairs`` pairs), a model built from the tiny preset (plus
``--set`` overrides; random weights), ``--steps`` optimizer steps of dpo_norm. Reported per mode
(rank 0; the ranks of one layout are alike):

- ``prepass_s``: building the DPO loop (the cached pre-pass over every pair; the frozen copy
  for online),
- ``tokens_per_s``: median over steps 2..N of (non-padding tokens of the step) / (step time);
  the online mode's step time includes its reference forward,
- peak memory above the memory held once the policy is built: CPU peak resident set (VmHWM,
  reset after the build; glibc's mmap threshold pinned so freed blocks leave the resident set)
  or CUDA ``max_memory_allocated``; and the bytes of weights the reference adds (analytical).

Prints a markdown table. Needs no GPU; uses CUDA when present.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kernels.memory import peak_bytes, pin_malloc_mmap_threshold, start_peak_window

MIB = 2**20


def run_mode(overrides: list[str]) -> dict:
    """One DPO run in this (distributed) process, timed in its parts."""
    from tulu3.config import load_config
    from tulu3.metrics import read_metrics
    from tulu3.parallel.ddp import unwrap
    from tulu3.train import LOOPS
    from tulu3.trainer import Trainer

    pin_malloc_mmap_threshold()
    cfg = load_config(None, overrides)
    trainer = Trainer(cfg, "dpo")
    tokenizer = trainer.load_tokenizer()
    shape = trainer.resolve_shape(tokenizer.vocab_size)
    chunks = trainer.build_model(shape)
    base = start_peak_window()
    started = time.perf_counter()
    loop = LOOPS["dpo"](trainer, tokenizer, chunks, shape.vocab)
    prepass = time.perf_counter() - started
    trainer.build_optimizer(chunks, loop.total_steps())
    trainer.fit(loop, chunks, shape, cfg.data.tokenizer)
    peak = peak_bytes() - base
    weights = sum(p.numel() * p.element_size() for c in chunks for p in unwrap(c).parameters())
    reference = loop.reference_chunks or []
    records = read_metrics(Path(cfg.train.run_dir) / "metrics.jsonl")
    return {"mode": cfg.dpo.reference_mode, "prepass_s": prepass, "peak_mib": peak / MIB,
            "policy_weights_mib": weights / MIB,
            "reference_weights_mib": sum(p.numel() * p.element_size() for c in reference
                                         for p in c.parameters()) / MIB,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records[1:]),
            "losses": [r["loss"] for r in records]}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--set", dest="overrides", nargs="*", default=[])
    args = parser.parse_args(argv)
    from tulu3.demo.data import make_tiny_data
    from tulu3.testing import run_distributed_test

    root = Path(tempfile.mkdtemp(prefix="bench_dpo_"))
    data = make_tiny_data(root / "data", n_dpo=args.pairs, n_sft=16, n_rlvr=8, n_eval=8, n_rm=8)
    rows = []
    for mode in ("cached", "online"):
        overrides = [f"data.tokenizer={data['tokenizer']}", f"data.train={data['dpo']}",
                     f"data.cache_dir={root / 'cache'}", "data.max_len=128", "data.pack=true",
                     "model.preset=tiny", "train.global_batch=32", "train.micro_batch=8",
                     "train.epochs=4",
                     f"train.max_steps={args.steps}", f"train.run_dir={root / mode}",
                     "train.plots=false", "optim.lr=1e-4", "optim.warmup=0",
                     f"dpo.reference_mode={mode}", *args.overrides]
        rows.append(run_distributed_test(run_mode, args.world, overrides)[0])
    print(f"\n{args.world} rank(s), {args.steps} steps, {args.pairs} pairs, overrides "
          f"{args.overrides or 'none'}, device {'cuda' if torch.cuda.is_available() else 'cpu'}")
    print("| mode | loop build s | tokens/s (median) | peak MiB above policy | "
          "policy weights MiB | reference weights MiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['prepass_s']:.2f} | {r['tokens_per_s']:.0f} | "
              f"{r['peak_mib']:.1f} | {r['policy_weights_mib']:.2f} | "
              f"{r['reference_weights_mib']:.2f} |")
    diffs = [abs(a - b) for a, b in zip(rows[0]["losses"], rows[1]["losses"], strict=True)]
    print(f"loss |cached - online| per step: max {max(diffs):.2e}; steps equal bit for bit: "
          f"{sum(d == 0 for d in diffs)} of {len(diffs)} (the first epoch's are, by design)")
    return rows


if __name__ == "__main__":
    main()
