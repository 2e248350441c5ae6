"""Generation throughput: tulu3's rollout engine vs HF transformers ``generate``, same model, same
prompts, one run.

    python tests/benchmarks/bench_generate.py [--layers 4 --hidden 512 --batch 16 \\
        --prompt-len 64 --new-tokens 128 --device cpu|cuda --dtype fp32|bf16]

A random Llama of the given shape is built with transformers, its weights loaded into a tulu3
(megatron) model at TP1 x PP1 in this process; both generate greedily ``--new-tokens`` tokens
for the same ``--batch`` prompts of ``--prompt-len`` random tokens (no eos, so every row runs
to the end). Reported: generated tokens per second (batch x new tokens / wall time, prefill
included, median of ``--repeat``) for the engine with its KV cache, the engine recomputing
every step (``--recompute``), and HF ``generate`` (its default dynamic KV cache), and whether
the greedy tokens agree. JSON with ``--json``.

Pipelined decoding (``--pp N``: N gloo processes, one pipeline stage each, megatron's random
init; no HF model): the same prompts generated as one batch (the stages take turns), as
``--micro-batches`` generation micro-batches one at a time (``in_flight=1``), and as those
micro-batches all in flight (the stages decode different micro-batches at once); the tokens
must agree. Variants alternate within each repeat, so machine load hits them alike.

    python tests/benchmarks/bench_generate.py --pp 2 --layers 8 --batch 16 --new-tokens 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from tulu3.parallel.groups import ProcessGroups


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=1376)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--recompute", action="store_true",
                        help="also time the engine without its KV cache")
    parser.add_argument("--pp", type=int, default=1,
                        help="> 1: time pipelined decoding on this many gloo processes")
    parser.add_argument("--micro-batches", type=int, default=0,
                        help="generation micro-batches with --pp (default: pp)")
    parser.add_argument("--json", help="write the results here")
    return parser.parse_args()


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, list, object]:
    """(HF model, tulu3 chunks, shape) with the same random weights."""
    from tulu3.config import load_config
    from tulu3.model import hf_mapping
    from tulu3.model.build import build_model_chunks
    from tulu3.model.presets import resolve_shape
    from tulu3.parallel.init import init_distributed, init_model_parallel
    from tulu3.parallel.layout import make_layout
    from tulu3.testing import tiny_hf_llama

    init_distributed()
    cfg = load_config(None, [f"model.layers={args.layers}", f"model.hidden={args.hidden}",
                             f"model.heads={args.heads}", f"model.kv_heads={args.kv_heads}",
                             f"model.ffn_hidden={args.ffn}", f"model.vocab={args.vocab}",
                             f"model.dtype={args.dtype}", "train.global_batch=1"])
    layout = make_layout(cfg, 1)
    init_model_parallel(layout, seed=0)
    shape = resolve_shape(cfg.model)
    hf = tiny_hf_llama(shape, seed=0)
    chunks = build_model_chunks(cfg.model, layout, ProcessGroups.current())
    state = hf.state_dict()
    for chunk in chunks:
        hf_mapping.load_hf_into_chunk(chunk, state.__getitem__, shape, 0, 1)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    hf = hf.to(device=args.device, dtype=dtype).eval()
    return hf, chunks, shape


def timed(fn, repeat: int, device: str) -> tuple[float, object]:
    """(median seconds, last result) over ``repeat`` runs after one warm-up."""
    result = fn()
    times = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _pipeline_rank(args: argparse.Namespace) -> dict:
    """One pipeline stage: median seconds of each variant, and the greedy tokens."""
    import torch.distributed as dist

    from tulu3.config import load_config
    from tulu3.model.build import build_model_chunks
    from tulu3.parallel.init import init_model_parallel
    from tulu3.parallel.layout import make_layout
    from tulu3.rollout import PipelineComm, SamplingParams, generate

    cfg = load_config(None, [f"model.layers={args.layers}", f"model.hidden={args.hidden}",
                             f"model.heads={args.heads}", f"model.kv_heads={args.kv_heads}",
                             f"model.ffn_hidden={args.ffn}", f"model.vocab={args.vocab}",
                             f"parallel.pp={args.pp}", "train.global_batch=1"])
    layout = make_layout(cfg, args.pp)
    init_model_parallel(layout, seed=0)
    groups = ProcessGroups.current()
    chunks = build_model_chunks(cfg.model, layout, groups)
    comm = PipelineComm.from_groups(groups)
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, args.vocab, (args.batch, args.prompt_len), generator=gen).tolist()
    params = SamplingParams(args.new_tokens)
    micro = args.micro_batches or args.pp
    budget = -(-args.batch // micro) * (args.prompt_len + args.new_tokens)
    variants = {"one batch (stages take turns)": {},
                f"{micro} micro-batches, one at a time": {"max_tokens": budget, "in_flight": 1},
                f"{micro} micro-batches in flight": {"max_tokens": budget, "in_flight": micro}}
    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    waits: dict[str, list[float]] = {name: [] for name in variants}
    waited = [0.0]
    recv = dist.recv

    def timed_recv(*a, **k):  # the engine's only blocking call: a stage waiting for another
        start = time.perf_counter()
        out = recv(*a, **k)
        waited[0] += time.perf_counter() - start
        return out

    dist.recv = timed_recv
    tokens = {}
    for repeat in range(args.repeat + 1):  # the first round warms up
        for name, kwargs in variants.items():
            dist.barrier()
            start, start_cpu, waited[0] = time.perf_counter(), time.process_time(), 0.0
            results = generate(chunks, prompts, params, cfg.model.vocab, [-1], comm=comm,
                               **kwargs)
            busy = time.process_time() - start_cpu
            dist.barrier()
            if repeat:
                times[name].append(time.perf_counter() - start)
                cpu[name].append(busy)
                waits[name].append(waited[0])
            tokens[name] = [r.tokens for r in results]
    same = all(t == tokens[next(iter(tokens))] for t in tokens.values())
    return {"seconds": {n: statistics.median(t) for n, t in times.items()}, "same": same,
            "cpu_seconds": {n: statistics.median(t) for n, t in cpu.items()},
            "wait_seconds": {n: statistics.median(t) for n, t in waits.items()}}


def pipeline_main(args: argparse.Namespace) -> None:
    from tulu3.testing import run_distributed_test

    ranks = run_distributed_test(_pipeline_rank, args.pp, args, timeout_s=3600)
    out = ranks[0]
    for key in ("cpu_seconds", "wait_seconds"):
        out[key] = {n: [r[key][n] for r in ranks] for n in out["seconds"]}
    tokens = args.batch * args.new_tokens
    first = next(iter(out["seconds"].values()))
    print(f"model: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, fp32 on cpu, "
          f"PP{args.pp} ({args.pp} gloo processes, 1 thread each); batch {args.batch} x prompt "
          f"{args.prompt_len} + {args.new_tokens} new tokens, greedy; median of {args.repeat}")
    print("| generation | seconds | tokens/s | speed-up | CPU s per stage | waiting s per stage "
          "|\n|---|---|---|---|---|---|")
    for name, secs in out["seconds"].items():
        busy = ", ".join(f"{c:.2f}" for c in out["cpu_seconds"][name])
        idle = ", ".join(f"{c:.2f}" for c in out["wait_seconds"][name])
        print(f"| {name} | {secs:.2f} | {tokens / secs:.0f} | {first / secs:.2f}x | {busy} "
              f"| {idle} |")
    print(f"same greedy tokens in every variant: {out['same']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), **out, "tokens": tokens}, f, indent=1)


def main() -> None:
    args = parse_args()
    if args.pp > 1:
        pipeline_main(args)
        return
    from tulu3.rollout import SamplingParams, generate

    hf, chunks, shape = build(args)
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, args.vocab, (args.batch, args.prompt_len), generator=gen)
    params = SamplingParams(args.new_tokens)
    no_eos = [-1]
    tokens = args.batch * args.new_tokens
    rows = {}

    def engine(use_cache: bool):
        return lambda: generate(chunks, prompts.tolist(), params, shape.vocab, no_eos,
                                use_cache=use_cache)

    seconds, ours = timed(engine(True), args.repeat, args.device)
    rows["tulu3 engine (KV cache)"] = seconds
    if args.recompute:
        rows["tulu3 engine (recompute)"] = timed(engine(False), args.repeat, args.device)[0]
    ids = prompts.to(args.device)

    def hf_generate():
        with torch.no_grad():
            return hf.generate(ids, attention_mask=torch.ones_like(ids),
                               max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                               do_sample=False, pad_token_id=0)

    seconds, theirs = timed(hf_generate, args.repeat, args.device)
    rows["HF transformers generate"] = seconds
    same = [r.tokens for r in ours] == theirs[:, args.prompt_len:].tolist()
    print(f"model: {args.layers} layers, hidden {args.hidden}, {args.heads} heads "
          f"({args.kv_heads} kv), vocab {args.vocab}, {args.dtype} on {args.device}; "
          f"batch {args.batch} x prompt {args.prompt_len} + {args.new_tokens} new tokens, "
          f"greedy; torch threads {torch.get_num_threads()}")
    print("| generator | seconds | tokens/s |\n|---|---|---|")
    for name, secs in rows.items():
        print(f"| {name} | {secs:.2f} | {tokens / secs:.0f} |")
    print(f"same greedy tokens as HF: {same}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "seconds": rows, "tokens": tokens,
                       "same_tokens": same}, f, indent=1)


if __name__ == "__main__":
    main()
