"""Parallel-layout planner CLI: which TP/PP/VPP/CP/DP to use for a stage on N GPUs.

    python -m tulu3.plan --model llama3.1-405b --gpus 256 --stage dpo --seq-len 2048 \\
        --global-batch 256 [--gpu h100-80gb] [--gpus-per-node 8] [--top 5] [--json]
    python -m tulu3.plan --config launch/recipes/llama3.1-405b-dpo.yaml --gpus 256 \\
        [--set key=value ...] [any flag above, which overrides the recipe's value]

Prints the fastest layouts that fit, each as ``--set`` overrides for ``tulu3.train`` with its
memory and step-time breakdown. The model and its assumptions are in docs/PLANNER.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from tulu3.config import run_command
from tulu3.planner import UNEVEN_KEYS, Candidate, PlanError, Problem, choose, search
from tulu3.planner.from_recipe import problem_from_recipe
from tulu3.planner.hardware import GIB
from tulu3.planner.recipe import recipe_wall_clock, tulu3_405b_stages

REQUIRED = ("model", "stage", "seq_len", "global_batch")
"""Flags required without --config (a recipe supplies them)."""


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only when it has one (None / []: taken from --config or derived)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, [], argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tulu3.plan", description=__doc__.split(
        "\n")[0], formatter_class=_DefaultsFormatter)
    add = parser.add_argument
    add("--config", default=None, help="a recipe YAML: model, stage, sequence length, batch, "
        "spec, precision and rlvr.* from it, as tulu3.train reads it; flags override it")
    add("--set", dest="sets", action="append", default=[], nargs="+", metavar="KEY=VALUE",
        help="with --config: recipe overrides, as tulu3.train's --set")
    add("--model", default=None, help="llama3.1-8b | llama3.1-70b | llama3.1-405b | tiny")
    add("--gpus", type=int, required=True, help="GPUs in the job")
    add("--stage", default=None, help="sft | dpo | rm | rlvr (with --config: the recipe's "
        "one stage section)")
    add("--seq-len", type=int, default=None,
        help="tokens per sequence (rlvr: prompt+response; recipe: data.max_len "
        "[+ rlvr.max_new_tokens])")
    add("--global-batch", type=int, default=None,
        help="train.global_batch: sequences (sft), pairs (dpo, rm), prompts (rlvr)")
    add("--micro-batch", type=int, default=None, help="train.micro_batch (1)")
    add("--gpu", default="h100-80gb", help="h100-80gb | h200-141gb | a100-80gb")
    add("--gpus-per-node", type=int, default=8)
    add("--top", type=int, default=5, help="layouts to print")
    add("--json", action="store_true", help="machine-readable output")
    add("--dpo-reference", default=None, help="cached (default) | online (a frozen copy in "
        "memory); recipe: dpo.reference_mode")
    add("--response-len", type=int, default=None,
        help="rlvr: generated tokens (seq-len // 2; recipe: rlvr.max_new_tokens)")
    add("--samples-per-prompt", type=int, default=None, help="rlvr (1)")
    add("--ppo-epochs", type=int, default=None, help="rlvr (4)")
    add("--value-model", default=None, help="rlvr: preset of the value model (the policy's; "
        "recipe: the size rlvr.value_model's name says)")
    add("--generation-tokens", type=int, default=None,
        help="rlvr: rlvr.generation_tokens, KV-cache slots per generation micro-batch "
        "(default: a rank's prompts in one micro-batch)")
    add("--spec", default=None, help="model.spec: te (default) | torch | local (no CP, unfused)")
    add("--unfused-logprobs", action="store_true", help="model.fused_logprobs=false")
    add("--precision", default=None, help="bf16 (default) | fp8 (model.fp8): the calibrated "
        "efficiency; recipe: fp8 when model.fp8 is set")
    add("--context-parallel", action=argparse.BooleanOptionalAction, default=None,
        help="propose CP > 1 layouts (default: with --spec torch, whose CP is tested; not te)")
    add("--mem-fraction", type=float, default=0.9, help="usable fraction of GPU memory")
    add("--overhead-gib", type=float, default=2.0, help="CUDA/NCCL/allocator overhead per GPU")
    return parser


def problem_from_args(args: argparse.Namespace) -> Problem:
    """The Problem the flags ask for: a recipe's (--config, --set) with the given flags over it,
    or the flags alone."""
    given = {"model": args.model, "stage": args.stage, "seq_len": args.seq_len,
             "global_batch": args.global_batch, "micro_batch": args.micro_batch,
             "gpu": args.gpu, "gpus_per_node": args.gpus_per_node,
             "dpo_reference": args.dpo_reference, "response_len": args.response_len,
             "samples_per_prompt": args.samples_per_prompt, "ppo_epochs": args.ppo_epochs,
             "value_model": args.value_model, "generation_tokens": args.generation_tokens,
             "spec": args.spec, "fused_logprobs": False if args.unfused_logprobs else None,
             "precision": args.precision, "context_parallel": args.context_parallel,
             "mem_fraction": args.mem_fraction, "overhead_gib": args.overhead_gib}
    sets = [text for group in args.sets for text in group]  # --set a=1 b=2 --set c=3
    if args.config is not None:
        stage = given.pop("stage")
        return problem_from_recipe(args.config, args.gpus, stage, sets, **given)
    if sets:
        raise PlanError("--set needs --config (it overrides a recipe's keys)")
    missing = [name for name in REQUIRED if given[name] is None]
    if missing:
        raise PlanError("without --config, pass " + ", ".join(
            f"--{name.replace('_', '-')}" for name in missing))
    # flags left at None (so that a recipe's value shows through) take Problem's own defaults
    fields = {key: value for key, value in given.items() if value is not None}
    return Problem(gpus=args.gpus, **fields)


def _gib(value: float) -> str:
    return f"{value / GIB:.1f}"


def format_candidate(index: int, cand: Candidate, problem: Problem) -> list[str]:
    """Lines describing one ranked layout: title, overrides, memory and time breakdown."""
    mem, time, lay = cand.memory, cand.time, cand.layout
    micro_batches = problem.step_seqs // (lay.dp * problem.micro_seqs)
    title = (f"#{index}  {cand.describe()}: step {time.total:.2f} s, peak {_gib(mem.total)} GiB "
             f"(pipeline rank {mem.rank}), {micro_batches} micro-batches per step")
    kinds = [(k, v) for k, v in mem.gib().items() if k != "total" and v > 0]
    parts = [(k, v) for k, v in time.as_dict().items() if k != "total" and v > 0.0005]
    lines = [title, f'    --set "{" ".join(cand.overrides(problem.micro_batch))}"',
             "    memory GiB: " + ", ".join(f"{k} {v:.1f}" for k, v in kinds),
             "    time s: " + ", ".join(f"{k} {v:.2f}" for k, v in parts)]
    if cand.uneven:
        lines.append(f"    uneven split: {problem.shape.layers} layers + embedding + loss over "
                     f"PP{lay.pp} x VPP{lay.vpp}; needs {' and '.join(UNEVEN_KEYS)}")
    return lines


def render_text(problem: Problem, ranked: list[Candidate], considered: int, fitting: int) -> str:
    nodes = max(1, problem.gpus // problem.gpus_per_node)
    what = (f"{problem.model} {problem.stage}: {problem.gpus} x {problem.gpu} ({nodes} node(s)), "
            f"seq {problem.seq_len}, global batch {problem.global_batch}, micro batch "
            f"{problem.micro_batch}")
    budget = (f"budget {_gib(problem.budget_bytes)} GiB per GPU ({problem.mem_fraction:g} x "
              f"{_gib(problem.gpu_spec.hbm_bytes)} GiB); {considered} layouts considered, "
              f"{fitting} fit; fastest first:")
    body = [line for i, cand in enumerate(ranked, 1)
            for line in [*format_candidate(i, cand, problem), ""]]
    return "\n".join([what, budget, "", *body]).rstrip() + "\n"


def render_json(problem: Problem, ranked: list[Candidate], considered: int, fitting: int) -> str:
    out = {"problem": asdict(problem), "budget_gib": round(problem.budget_bytes / GIB, 3),
           "considered": considered, "fitting": fitting,
           "layouts": [cand.as_dict(problem) for cand in ranked]}
    if problem.model == "llama3.1-405b":  # the whole Tülu 3 405B recipe on this cluster
        stages = tulu3_405b_stages(problem.gpus, problem.gpu, problem.precision)
        out["tulu3_405b_recipe"] = recipe_wall_clock(stages)
    return json.dumps(out, indent=2)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        problem = problem_from_args(args)
        candidates = search(problem)
        ranked = choose(problem, candidates, top=args.top)
    except PlanError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    fitting = sum(c.fits for c in candidates)
    render = render_json if args.json else render_text
    print(render(problem, ranked, len(candidates), fitting), end="" if not args.json else "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, "tulu3.plan"))
