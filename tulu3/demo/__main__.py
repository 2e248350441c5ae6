"""``python -m tulu3.demo``: the whole Tülu 3 pipeline, tiny, on CPU, in minutes.

data -> curation (decontamination against the eval split) -> SFT -> DPO -> RLVR, each stage a
real ``torchrun`` of ``tulu3.train`` on 4 CPU processes in a TP2xPP2 (or TP2xDP2) layout, then
HF export (checked against transformers when installed), ``tulu3.eval`` of every stage's
checkpoint, and ``OUT/report.md`` with the metrics and plots of each stage.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tulu3.demo.data import make_tiny_data
from tulu3.demo.report import write_report

LAYOUTS = {"tp2pp2": ["parallel.tp=2", "parallel.pp=2"],
           "tp2dp2": ["parallel.tp=2", "parallel.pp=1"]}
MODEL = ["model.preset=tiny"]
# Per-stage settings of the measured tiny experiment (docs/PERFORMANCE.md, RLVR learning): SFT
# long enough to learn single-digit sums, RLVR (GRPO) long enough to find the verified style.
SFT = ["train.global_batch=32", "train.micro_batch=32", "train.max_steps=150", "train.epochs=2",
       "optim.lr=3e-3", "optim.warmup=5", "optim.schedule=constant", "sft.loss_reduction=mean",
       "data.max_len=64", "data.pack=false", "train.eval_every=50"]
DPO = ["train.max_steps=16", "optim.lr=5e-4"]
RLVR = ["train.max_steps=20", "train.micro_batch=16", "rlvr.max_new_tokens=20", "optim.lr=2e-4",
        "rlvr.algo=grpo", "rlvr.kl_beta=0.01"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tulu3.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="output directory")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps per stage (default: each recipe's own)")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="tp2pp2")
    parser.add_argument("--nproc", type=int, default=4, help="processes per stage")
    parser.add_argument("--eval-samples", type=int, default=40, help="eval prompts per stage")
    return parser.parse_args(argv)


def _log(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _run(command: list[str], log: Path) -> float:
    """Run a command, streaming its output to ``log`` and a short progress line to stdout."""
    started = time.monotonic()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with log.open("w") as handle:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            handle.write(line)
            if line.startswith(("step ", "[tulu3]", "[eval]")):
                print("    " + line.rstrip(), flush=True)
        if proc.wait() != 0:
            raise SystemExit(f"demo: {' '.join(command[:6])} ... failed; see {log}")
    return time.monotonic() - started


def torchrun(nproc: int) -> list[str]:
    from tulu3.parallel.init import free_port

    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-port", str(free_port())]


def latest_checkpoint(run_dir: Path) -> Path:
    root = run_dir / "checkpoints"
    return root / (root / "latest").read_text().strip()


def curate(data: dict[str, str], out: Path) -> dict:
    """Plant three eval prompts in the SFT split, remove every overlapping row, then add the
    verifiable task's SFT chats (in-distribution by design: its eval is add_eval.jsonl)."""
    from tulu3.data.curate import decontaminate
    from tulu3.data.loading import read_rows, write_jsonl

    sft = [row for row, _ in read_rows(data["sft"])]
    evals = [row for row, _ in read_rows(data["eval"])]
    planted = [{"messages": [*row["messages"], {"role": "assistant", "content":
                f"The answer is {row['ground_truth']}."}]} for row in evals[:3]]
    rows = sft + planted
    # The synthetic prompts are short ("What is 23 + 45?"): 4-grams instead of Tülu 3's 8.
    removed, report = decontaminate(rows, {"eval": evals}, n=4)
    drop = set(removed)
    kept = [r for i, r in enumerate(rows) if i not in drop]
    write_jsonl(kept, out / "sft_curated.jsonl")
    additions = [row for row, _ in read_rows(data["add_sft"])]
    path = write_jsonl(kept + additions, out / "sft_mix.jsonl")
    report.update(planted=len(planted), planted_removed=len(drop & set(range(len(sft),
                                                                                 len(rows)))))
    data["sft"] = path
    return report


def run_stage(stage: str, args: argparse.Namespace, data: dict[str, str], out: Path,
              load: Path | None, extra: list[str]) -> dict:
    run_dir = out / stage
    overrides = [*MODEL, *LAYOUTS[args.layout], f"train.run_dir={run_dir}",
                 f"data.tokenizer={data['tokenizer']}", f"data.cache_dir={out / 'cache'}",
                 "train.resume=none", *extra]
    if load is not None:
        overrides.append(f"model.load={load}")
    if args.steps:
        overrides.append(f"train.max_steps={args.steps}")
    command = [*torchrun(args.nproc), "-m", "tulu3.train", "--stage", stage, "--config",
               f"launch/recipes/tiny-{stage}.yaml", "--set", *overrides]
    _log(f"{stage}: torchrun x{args.nproc} ({args.layout})")
    seconds = _run(command, out / f"{stage}.log")
    return {"stage": stage, "seconds": seconds, "run_dir": str(run_dir),
            "checkpoint": str(latest_checkpoint(run_dir)), "layout": args.layout}


def evaluate(checkpoint: str, data: dict[str, str], out: Path, name: str, samples: int) -> dict:
    report = out / f"eval_{name}.json"
    command = [sys.executable, "-m", "tulu3.eval", "--ckpt", checkpoint, "--data",
               data["add_eval"], "--max-new-tokens", "20", "--limit", str(samples), "--workers",
               "1", "--tokenizer", data["tokenizer"], "--out", str(report),
               "--show", str(samples)]  # every reply: the report counts their styles
    _log(f"eval {name}")
    _run(command, out / f"eval_{name}.log")
    return json.loads(report.read_text())


def export_and_check(checkpoint: str, out: Path) -> dict:
    """HF export of the final checkpoint, and its logits against tulu3's own forward."""
    hf_dir = out / "hf"
    _log(f"export {checkpoint} -> {hf_dir}")
    _run([sys.executable, "-m", "checkpoints_tools.megatron_to_hf", "--ckpt", checkpoint,
          "--out", str(hf_dir), "--force"], out / "export.log")
    _run([sys.executable, "-m", "tulu3.demo.check_export", "--ckpt", checkpoint, "--hf",
          str(hf_dir), "--out", str(out / "export_check.json")], out / "export_check.log")
    return json.loads((out / "export_check.json").read_text())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    _log(f"data -> {out / 'data'}")
    data = make_tiny_data(out / "data")
    curation = curate(data, out)
    _log(f"curation: removed {curation['removed_rows']} of {curation['train_rows']} SFT rows "
         f"({curation['planted_removed']}/{curation['planted']} planted eval prompts)")
    sft = run_stage("sft", args, data, out, None,
                    [*SFT, f"data.train={data['sft']}", f"data.eval={data['sft_eval']}"])
    dpo = run_stage("dpo", args, data, out, Path(sft["checkpoint"]),
                    [*DPO, f"data.train={data['dpo']}", f"data.eval={data['dpo_eval']}"])
    rlvr = run_stage("rlvr", args, data, out, Path(dpo["checkpoint"]),
                     [*RLVR, f"data.train={data['add_rlvr']}", f"data.eval={data['add_eval']}"])
    stages = [sft, dpo, rlvr]
    for stage in stages:
        stage["eval"] = evaluate(stage["checkpoint"], data, out, stage["stage"],
                                 args.eval_samples)
    export = export_and_check(rlvr["checkpoint"], out)
    path = write_report(out, stages, curation, export, time.monotonic() - started)
    _log(f"done in {time.monotonic() - started:.0f} s: {path}")


if __name__ == "__main__":
    main()
