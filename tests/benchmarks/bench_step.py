"""tulu3's training step next to Hugging Face transformers', same process, shapes, batch and data.

Rows (one table on stdout, the same numbers in ``--out`` JSON):

- ``tulu3``: the step training runs: megatron-core GPTModel from tulu3's builders (``torch`` spec,
  SDPA attention), megatron DDP, megatron's optimizer (bf16 params, fp32 main weights and grads),
  ``tulu3.step.train_step`` with the SFT stage (fused log-prob cross entropy, per-token mean).
- ``hf``: transformers ``LlamaForCausalLM`` of the same shape and the same initial weights (copied
  HF -> tulu3 with tulu3.model.hf_mapping), SDPA attention, params in ``--dtype``,
  ``torch.optim.AdamW`` (fused on CUDA), full logits -> fp32 cross entropy, the same grad clip.
- ``dpo``: tulu3's DPO forward + backward (``run_schedule``, no optimizer step): dpo_norm on
  (chosen, rejected) pairs in one micro-batch, cached reference log-probs.
- ``logprob_fused`` / ``logprob_naive``: forward + backward of the output layer's log-probs over
  the step's tokens, ``kernels.linear_logprobs`` vs logits -> log_softmax -> gather
  (``kernels.bench.measure``; peak is above the inputs there).

Model FLOPs per token: ``tulu3.model.presets.flops_per_token``, which is the issue's definition
exactly: 6 x (layer + output-layer matmul params) + 12 x layers x hidden x seq. Timing excludes
``--warmup`` steps and synchronizes CUDA around every step; peak memory is
``torch.cuda.max_memory_allocated`` from the first step of a system (the other system is freed
first), on CPU the process's peak resident set. The step-0 losses of tulu3 and HF are compared:
same weights, same batch.

On one H200 (defaults = 8 layers of Llama 3.1 8B, vocab 128256, seq 4096, micro-batch 2, bf16;
megatron-core installed, e.g. from a cp312 wheel into /tmp/site):

    PYTHONPATH=/tmp/site:. python tests/benchmarks/bench_step.py --out runs/bench_step/h200.json

CPU check (tiny shapes, fp32, not a performance figure):

    python tests/benchmarks/bench_step.py --tiny --steps 2 --warmup 1 \\
        --out runs/bench_step/tiny.json
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kernels.memory import peak_bytes, start_peak_window

TINY = dict(layers=2, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=512, seq=64, micro_batch=2,
            dtype="fp32")
GIB = 1 << 30
LR, CLIP, BETAS, EPS = 1e-5, 1.0, (0.9, 0.95), 1e-8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=14336)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--tiny", action="store_true", help="CPU preset (explicit flags win): "
                        + ", ".join(f"{k}={v}" for k, v in TINY.items()))
    parser.add_argument("--compile", action="store_true", help="torch.compile the HF model")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--set", dest="overrides", action="append", default=[], nargs="+",
                        metavar="KEY=VALUE", help="more tulu3 recipe keys for the tulu3 and "
                        "dpo rows (e.g. model.fp8=current, model.fused=all)")
    parser.add_argument("--out", default="runs/bench_step/result.json")
    if parser.parse_known_args(argv)[0].tiny:
        parser.set_defaults(**TINY)
    return parser.parse_args(argv)


def tulu3_config(args: argparse.Namespace) -> Any:
    """The recipe tulu3 would run with: this shape, torch spec, per-token mean SFT loss,
    constant LR from step 0 (so both systems take the same first update)."""
    from tulu3.config import load_config

    return load_config(None, [
        "model.preset=llama3.1-8b", f"model.layers={args.layers}", f"model.hidden={args.hidden}",
        f"model.heads={args.heads}", f"model.kv_heads={args.kv_heads}",
        f"model.ffn_hidden={args.ffn}", f"model.vocab={args.vocab}", "model.spec=torch",
        f"model.dtype={args.dtype}", "model.fused_logprobs=true", "sft.loss_reduction=mean",
        f"optim.lr={LR}", "optim.warmup=0", "optim.schedule=constant", f"optim.clip={CLIP}",
        f"optim.beta1={BETAS[0]}", f"optim.beta2={BETAS[1]}", f"optim.eps={EPS}",
        "optim.weight_decay=0.0", f"train.seed={args.seed}", f"data.max_len={args.seq}",
        *(item for group in args.overrides for item in group)])


# --- data ---------------------------------------------------------------------------------------


def sft_batch(vocab: int, rows: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    """Random tokens, one sequence per row, every next token trained (tulu3's micro-batch dict)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (rows, seq), generator=gen)
    labels = torch.full_like(tokens, -100)
    labels[:, :-1] = tokens[:, 1:]
    return {"tokens": tokens, "labels": labels,
            "position_ids": torch.arange(seq).expand(rows, seq).contiguous(),
            "seq_ids": torch.arange(rows)[:, None].expand(rows, seq).contiguous(),
            "example_ids": torch.arange(rows)}


def dpo_batch(vocab: int, rows: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    """Pairs (rows 2i, 2i + 1) sharing a prompt (first half, untrained); cached reference sums."""
    pairs = max(1, rows // 2)
    batch = sft_batch(vocab, 2 * pairs, seq, seed)
    prompt = seq // 2
    batch["tokens"][1::2, :prompt] = batch["tokens"][0::2, :prompt]
    batch["labels"][:, :prompt] = -100  # later labels stay the next tokens
    batch["example_ids"] = torch.arange(pairs).repeat_interleave(2)
    reference = torch.full((pairs,), -(seq - prompt - 1) * math.log(vocab))
    batch["ref_chosen_logps"], batch["ref_rejected_logps"] = reference, reference.clone()
    return batch


# --- measuring ----------------------------------------------------------------------------------


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> float:
    """Start a peak-memory window; returns GiB held now."""
    sync()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        return start_peak_window() / GIB
    except OSError:
        return float("nan")


def peak_gib() -> float:
    """GPU: max_memory_allocated; CPU: the process's peak resident set (VmHWM)."""
    return peak_bytes() / GIB


def time_steps(step: Callable[[int], float], steps: int, warmup: int) -> dict[str, Any]:
    """Run ``warmup + steps`` steps; losses of all, seconds of the timed ones, peak memory."""
    resident = reset_peak()
    losses, seconds = [], []
    for index in range(warmup + steps):
        sync()
        start = time.perf_counter()
        losses.append(step(index))
        sync()
        if index >= warmup:
            seconds.append(time.perf_counter() - start)
    return {"losses": losses, "step_s": seconds, "peak_gib": peak_gib(),
            "resident_gib_at_start": resident}


def row(system: str, label: str, result: dict, tokens: int, flops_per_token: float) -> dict:
    tokens_per_s = tokens * len(result["step_s"]) / sum(result["step_s"])
    return {"system": system, "label": label, "tokens_per_step": tokens,
            "tokens_per_s": tokens_per_s, "tflops": flops_per_token * tokens_per_s / 1e12,
            "step_ms": 1e3 * sum(result["step_s"]) / len(result["step_s"]), **result}


# --- the two systems ----------------------------------------------------------------------------


def build_hf(shape: Any, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """transformers' LlamaForCausalLM of ``shape`` with its own initialisation, SDPA attention.

    Built in ``dtype`` as ``from_pretrained(dtype=...)`` does: ``.to(bf16)`` would also round
    RoPE's fp32 ``inv_freq`` buffer to bf16 and compute other numbers than tulu3 and real runs."""
    from transformers import AutoModelForCausalLM

    from tulu3.testing import hf_llama_config

    config = hf_llama_config(shape, use_cache=False, attn_implementation="sdpa")
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    return model.train()


def init_weights(shape: Any, seed: int, device: torch.device,
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The initial weights both systems start from, as CPU tensors in ``dtype``."""
    torch.manual_seed(seed)
    model = build_hf(shape, device, dtype)
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    del model
    return state


def bench_hf(shape: Any, state: dict, batch: dict, args: argparse.Namespace,
             dtype: torch.dtype, device: torch.device) -> dict:
    """HF training step: forward, fp32 cross entropy over full logits, backward, clip, AdamW.

    Everything built here is freed on return (the next system's peak must not count it)."""
    model = build_hf(shape, device, dtype)
    model.load_state_dict(state)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS,
                                  weight_decay=0.0, fused=device.type == "cuda")
    forward = torch.compile(model) if args.compile else model
    result = time_steps(hf_step(model, forward, optimizer, batch, device), args.steps,
                        args.warmup)
    if args.compile:
        torch._dynamo.reset()
    return result


def hf_step(model: torch.nn.Module, forward: Callable, optimizer: torch.optim.Optimizer,
            batch: dict, device: torch.device) -> Callable[[int], float]:
    params = list(model.parameters())

    def step(_index: int) -> float:
        optimizer.zero_grad(set_to_none=True)
        tokens = batch["tokens"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        logits = forward(input_ids=tokens).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        optimizer.step()
        return loss.detach().item()

    return step


def build_tulu3(cfg: Any, shape: Any, state: dict) -> tuple[Any, list]:
    """Trainer (one-process world, megatron groups), chunks holding the HF weights, optimizer."""
    from tulu3.model import hf_mapping
    from tulu3.model.build import build_model_chunks
    from tulu3.parallel.ddp import wrap_ddp
    from tulu3.trainer import Trainer

    trainer = Trainer(cfg, "sft")
    chunks = build_model_chunks(cfg.model, trainer.layout, trainer.groups)
    for chunk in chunks:
        hf_mapping.load_hf_into_chunk(chunk, state.__getitem__, shape, 0, 1)
    chunks = wrap_ddp(chunks, trainer.layout)
    trainer.build_optimizer(chunks, total_steps=1 << 20)
    return trainer, chunks


def bench_tulu3(trainer: Any, chunks: list, batch: dict, args: argparse.Namespace) -> dict:
    """tulu3.step.train_step with the SFT stage: the training step, unchanged."""
    from tulu3.parallel.groups import ProcessGroups
    from tulu3.stages.sft import SFTStage
    from tulu3.step import train_step

    cfg = trainer.cfg
    stage = SFTStage(ProcessGroups.current().vocab_shard(args.vocab), cfg.sft.loss_reduction,
                     cfg.model.fused_logprobs)

    def step(index: int) -> float:
        metrics = train_step(chunks, trainer.optimizer, trainer.scheduler, [batch], stage,
                             trainer.layout, step=index)
        return metrics["loss"]

    return time_steps(step, args.steps, args.warmup)


def bench_dpo(trainer: Any, chunks: list, batch: dict, args: argparse.Namespace) -> dict:
    """DPO (dpo_norm) forward + backward through megatron's schedule, no optimizer step."""
    from tulu3.parallel.groups import ProcessGroups
    from tulu3.stages.dpo.stage import DPOStage
    from tulu3.step import run_schedule

    stage = DPOStage(ProcessGroups.current().vocab_shard(args.vocab), "dpo_norm", beta=5.0,
                     fused=trainer.cfg.model.fused_logprobs)

    def step(_index: int) -> float:
        for chunk in chunks:
            chunk.zero_grad_buffer()
        return run_schedule(chunks, [batch], stage, trainer.layout)["loss"]

    return time_steps(step, args.steps, args.warmup)


def bench_logprobs(args: argparse.Namespace, dtype: torch.dtype, tokens: int) -> list[dict]:
    """Fused kernel vs naive log-probs, forward + backward (kernels.bench.measure)."""
    from kernels.bench import measure
    from kernels.logprobs import resolve_impl

    device = "cuda" if torch.cuda.is_available() else "cpu"
    fused = resolve_impl("auto", torch.empty(0, device=device))
    flops = 6.0 * args.vocab * args.hidden  # the output layer's matmul, forward + backward

    def one(impl: str) -> dict:
        reset_peak()
        out = measure(tokens, args.hidden, args.vocab, dtype, impl, device, repeat=args.steps)
        return {"losses": [], "step_s": [t / 1e3 for t in out["times_ms"]],
                "peak_gib": out["peak_mib"] / 1024, "resident_gib_at_start": 0.0}

    return [attempt("logprob_fused", f"log-probs fused, {fused} (fwd+bwd)", tokens, flops,
                    lambda: one(fused)),
            attempt("logprob_naive", "log-probs naive (fwd+bwd)", tokens, flops,
                    lambda: one("reference"))]


def attempt(system: str, label: str, tokens: int, flops_per_token: float,
            measure: Callable[[], dict]) -> dict:
    """A row, or a row holding the error: one failed system (OOM, ...) keeps the others' rows."""
    try:
        return row(system, label, measure(), tokens, flops_per_token)
    except Exception as err:  # noqa: BLE001 - reported in the row and the exit status
        return failed(system, label, err)


def failed(system: str, label: str, err: Exception) -> dict:
    traceback.print_exc()
    return {"system": system, "label": label, "error": f"{type(err).__name__}: {err}"[:300]}


def tulu3_rows(cfg: Any, shape: Any, state: dict, batch: dict, args: argparse.Namespace,
               fpt: float) -> list[dict]:
    """The SFT train step and the DPO forward + backward, on one tulu3 model."""
    sft_label, dpo_label = ("tulu3 SFT step (megatron-core, torch spec)",
                            "tulu3 DPO fwd+bwd (chosen+rejected)")
    try:
        trainer, chunks = build_tulu3(cfg, shape, state)
    except Exception as err:  # noqa: BLE001 - reported in the rows and the exit status
        return [failed("tulu3", sft_label, err), failed("dpo", dpo_label, err)]
    pairs = dpo_batch(args.vocab, args.micro_batch, args.seq, args.seed + 1)
    return [attempt("tulu3", sft_label, batch["tokens"].numel(), fpt,
                    lambda: bench_tulu3(trainer, chunks, batch, args)),
            attempt("dpo", dpo_label, pairs["tokens"].numel(), fpt,
                    lambda: bench_dpo(trainer, chunks, pairs, args))]


# --- report -------------------------------------------------------------------------------------


def table(rows: list[dict]) -> str:
    hf = next((r for r in rows if r["system"] == "hf" and "error" not in r), None)
    lines = ["| system | TFLOP/s (model FLOPs) | tokens/s | peak GiB | ratio vs HF |",
             "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | error: {r['error'][:80]} | | | |")
            continue
        ratio = (f"{r['tokens_per_s'] / hf['tokens_per_s']:.2f}x"
                 if hf and r["system"] in ("tulu3", "hf") else "n/a")
        lines.append(f"| {r['label']} | {r['tflops']:.3g} | {r['tokens_per_s']:,.0f} | "
                     f"{r['peak_gib']:.2f} | {ratio} |")
    return "\n".join(lines)


def loss_check(rows: list[dict]) -> dict[str, float] | None:
    """Step-0 losses of tulu3 and HF (same weights and batch) and their difference."""
    by_system = {r["system"]: r for r in rows if "error" not in r}
    if not {"tulu3", "hf"} <= set(by_system):
        return None
    ours, hf = by_system["tulu3"]["losses"][0], by_system["hf"]["losses"][0]
    return {"tulu3": ours, "hf": hf, "abs_diff": abs(ours - hf)}


def run(args: argparse.Namespace) -> dict:
    from tulu3.model.build import DTYPES
    from tulu3.model.presets import flops_per_token, resolve_shape

    cfg = tulu3_config(args)
    shape = resolve_shape(cfg.model)
    dtype = DTYPES[args.dtype]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fpt = flops_per_token(shape, args.seq)  # = the definition, see the module docstring
    batch = sft_batch(args.vocab, args.micro_batch, args.seq, args.seed)
    state = init_weights(shape, args.seed, device, dtype)
    hf = attempt("hf", "HF transformers LlamaForCausalLM" + (" (compiled)" * args.compile),
                 batch["tokens"].numel(), fpt,
                 lambda: bench_hf(shape, state, batch, args, dtype, device))
    ours = tulu3_rows(cfg, shape, state, batch, args, fpt)
    rows = [ours[0], hf, ours[1], *bench_logprobs(args, dtype, batch["tokens"].numel())]
    return {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "versions": versions(), "args": vars(args), "shape": dataclasses.asdict(shape),
            "flops_per_token": fpt, "loss_step0": loss_check(rows), "rows": rows}


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "megatron-core")}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = run(args)
    print(f"bench_step on {result['device']}: layers {args.layers}, hidden {args.hidden}, "
          f"vocab {args.vocab}, seq {args.seq}, micro-batch {args.micro_batch}, {args.dtype}, "
          f"{args.steps} timed steps after {args.warmup}")
    print(table(result["rows"]))
    loss0 = result["loss_step0"]
    if loss0:
        print(f"step-0 loss: tulu3 {loss0['tulu3']:.6f}, hf {loss0['hf']:.6f} "
              f"(|diff| {loss0['abs_diff']:.2e})", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    if any("error" in r for r in result["rows"]):
        raise SystemExit(f"bench_step: some rows failed (see the table); {out} has the rest")
    return result


if __name__ == "__main__":
    main()
