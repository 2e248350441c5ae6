"""SFT throughput benchmark, from the repository root:

    torchrun --nproc-per-node N tests/benchmarks/bench_sft.py [--set k=v ...]

Runs the real SFT stage (tulu3.train's code path) on synthetic data for a few steps and prints
the median tokens/s over the steps after warm-up, and on GPU the model TFLOP/s per GPU and MFU.
Defaults: the tiny recipe on CPU. Example on one 8-GPU node:

    torchrun --nproc-per-node 8 tests/benchmarks/bench_sft.py --set model.preset=llama3.1-8b \\
        parallel.tp=8 parallel.pp=1 model.dtype=bf16 data.max_len=4096 train.micro_batch=1
"""

from __future__ import annotations

import argparse
import shutil
import statistics
from pathlib import Path

import torch
import torch.distributed as dist

from tulu3.config import load_config
from tulu3.demo.data import make_tiny_data
from tulu3.metrics import read_metrics
from tulu3.model.presets import flops_per_token, resolve_shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--set", dest="overrides", nargs="+", default=[])
    parser.add_argument("--out", default="runs/bench_sft")
    args = parser.parse_args()
    from tulu3.parallel.init import init_distributed
    from tulu3.train import run_stage

    init_distributed()
    out = Path(args.out)
    if dist.get_rank() == 0:  # one writer; the others wait for the files
        shutil.rmtree(out / "run", ignore_errors=True)
        make_tiny_data(out / "data", n_sft=2048, n_rm=8)
    dist.barrier()
    overrides = [f"data.tokenizer={out / 'data' / 'tokenizer.model'}",
                 f"data.train={out / 'data' / 'sft.jsonl'}", f"train.run_dir={out / 'run'}",
                 f"train.max_steps={args.steps}", "train.save_every=0", "train.plots=false",
                 "train.resume=none", "data.pack=true", "data.eval=null", *args.overrides]
    cfg = load_config("launch/recipes/tiny-sft.yaml", overrides)
    run_stage(cfg, "sft")
    if dist.get_rank() != 0:
        return
    records = read_metrics(out / "run" / "metrics.jsonl")[args.warmup:]
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in records)
    world = dist.get_world_size()
    line = (f"bench_sft: {world} ranks, tp={cfg.parallel.tp} pp={cfg.parallel.pp}, "
            f"median {tokens_per_s:,.0f} tokens/s ({tokens_per_s / world:,.0f} per rank)")
    if torch.cuda.is_available():
        shape = resolve_shape(cfg.model)
        tflops = flops_per_token(shape, cfg.data.max_len) * tokens_per_s / world / 1e12
        mfu = statistics.median(r.get("mfu", 0.0) for r in records)
        line += f", {tflops:.0f} TFLOP/s per GPU, MFU {mfu:.1%}"
    print(line, flush=True)


if __name__ == "__main__":
    main()
