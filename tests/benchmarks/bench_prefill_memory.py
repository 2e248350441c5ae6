"""Measured peak memory of one generation prefill against the planner's model of it.

    python tests/benchmarks/bench_prefill_memory.py [--layers 3 --hidden 128 --ffn 352 \\
        --vocab 1000 --shapes 1x256,4x256,2x512,8x512]

For each ``rows x prompt`` shape, a fresh child process (peak RSS of a reused process says
nothing) builds a random tiny Llama at TP1 x PP1 in fp32 on CPU (tulu3's own megatron model,
torch spec), runs ``generate`` once to load code and warm the kernels, pins glibc's mmap
threshold (kernels/memory.py: freed tensors leave the resident set), then measures one more
``generate`` of the same prompts with ``max_new_tokens=1`` (a prefill and one pick) in a
peak-RSS window (kernels/memory.py ``start_peak_window`` / ``peak_bytes``). The prediction is
the planner's :func:`tulu3.planner.prefill.prefill_peak` in fp32 plus the KV cache the call
allocates (rows x (prompt + 1) slots x layers x 2 x kv_heads x head_dim x 4 bytes).
Reported: measured and predicted MiB and their ratio. JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

MIB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--ffn", type=int, default=352)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--shapes", default="1x256,4x256,2x512,8x512",
                        help="rows x prompt tokens, comma separated")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # rows x prompt, measured here
    parser.add_argument("--json", help="write the results here")
    return parser.parse_args(argv)


def measure(args: argparse.Namespace, rows: int, prompt: int) -> dict:
    """In this (fresh) process: peak RSS above the window's start of one prefill, bytes."""
    import torch

    from kernels.memory import peak_bytes, pin_malloc_mmap_threshold, start_peak_window
    from tulu3.config import load_config
    from tulu3.model.build import build_model_chunks
    from tulu3.parallel.groups import ProcessGroups
    from tulu3.parallel.init import init_distributed, init_model_parallel
    from tulu3.parallel.layout import make_layout
    from tulu3.rollout import SamplingParams, generate

    pin_malloc_mmap_threshold()
    torch.set_num_threads(1)  # per-thread SDPA / GEMM tiles stay out of the count
    init_distributed()
    cfg = load_config(None, [f"model.layers={args.layers}", f"model.hidden={args.hidden}",
                             f"model.heads={args.heads}", f"model.kv_heads={args.kv_heads}",
                             f"model.ffn_hidden={args.ffn}", f"model.vocab={args.vocab}",
                             "model.spec=torch", "train.global_batch=1"])
    layout = make_layout(cfg, 1)
    init_model_parallel(layout, seed=0)
    chunks = build_model_chunks(cfg.model, layout, ProcessGroups.current())
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, args.vocab, (rows, prompt), generator=gen).tolist()
    params = SamplingParams(max_new_tokens=1, temperature=1.0, top_p=0.9, seed=3)
    generate(chunks, prompts, params, args.vocab, eos_ids=[0])  # warm-up: code, kernels
    base = start_peak_window("cpu")
    generate(chunks, prompts, params, args.vocab, eos_ids=[0])
    return {"peak_bytes": peak_bytes("cpu") - base}


def predict(args: argparse.Namespace, rows: int, prompt: int) -> dict:
    """The planner's fp32 prefill peak plus the KV cache of the call, bytes."""
    from tulu3.model.presets import LlamaShape, padded_vocab
    from tulu3.planner.prefill import prefill_peak

    shape = LlamaShape(layers=args.layers, hidden=args.hidden, heads=args.heads,
                       kv_heads=args.kv_heads, ffn_hidden=args.ffn, vocab=args.vocab)
    peak = prefill_peak(shape, rows, prompt, tp=1, last=True,
                        vocab_rows=padded_vocab(args.vocab, 1), act_bytes=4)
    kv = 2 * 4 * args.layers * args.kv_heads * shape.head_dim * rows * (prompt + 1)
    return {"prefill_bytes": peak.total, "kv_cache_bytes": kv,
            "predicted_bytes": peak.total + kv}


def run_child(argv: list[str], shape: str) -> dict:
    """``measure`` of one shape in a fresh interpreter; its JSON line."""
    out = subprocess.run([sys.executable, __file__, *argv, "--child", shape],
                         capture_output=True, text=True, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child:
        rows, prompt = (int(x) for x in args.child.split("x"))
        print(json.dumps(measure(args, rows, prompt)))
        return 0
    results = []
    print(f"{'rows x prompt':>14} {'measured MiB':>13} {'predicted MiB':>14} "
          f"{'(prefill + KV)':>16} {'predicted/measured':>19}")
    for shape in args.shapes.split(","):
        rows, prompt = (int(x) for x in shape.split("x"))
        row = {"rows": rows, "prompt": prompt, **run_child(argv, shape),
               **predict(args, rows, prompt)}
        row["ratio"] = row["predicted_bytes"] / row["peak_bytes"]
        results.append(row)
        parts = f"{row['prefill_bytes'] / MIB:.2f} + {row['kv_cache_bytes'] / MIB:.2f}"
        print(f"{shape:>14} {row['peak_bytes'] / MIB:13.2f} {row['predicted_bytes'] / MIB:14.2f} "
              f"{parts:>16} {row['ratio']:19.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
