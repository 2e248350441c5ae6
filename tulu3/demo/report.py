"""``OUT/report.md``: per stage the layout, steps, time, final metrics, eval accuracy and plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tulu3.metrics import read_metrics

# Metrics shown per stage (when the stage logs them).
SHOWN = {
    "sft": ("loss", "token_loss", "eval/token_loss", "grad_norm"),
    "dpo": ("loss", "rewards/accuracy", "rewards/margin", "eval/rewards/accuracy"),
    "rlvr": ("reward", "verified", "no_eos", "kl", "entropy", "response_length"),
}
PLOTS = {"sft": ("loss",), "dpo": ("loss", "dpo_rewards"), "rlvr": ("rlvr_reward", "rlvr_kl")}


def eval_accuracy(report: dict[str, Any]) -> float | None:
    """Overall verified accuracy from a ``tulu3.eval`` report."""
    overall = (report.get("summary") or {}).get("all") or {}
    accuracy = overall.get("accuracy")
    return float(accuracy) if isinstance(accuracy, (int, float)) else None


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _stage_section(out: Path, stage: dict) -> list[str]:
    name = stage["stage"]
    records = read_metrics(Path(stage["run_dir"]) / "metrics.jsonl")
    first, last = records[0], records[-1]
    lines = [f"## {name.upper()}", "",
             f"- layout: {stage['layout']}; steps: {last['step']}; wall time (with start-up): "
             f"{stage['seconds']:.0f} s; checkpoint: `{stage['checkpoint']}`", "",
             "| metric | first step | last step |", "|---|---|---|"]
    for key in SHOWN[name]:
        if key in last:
            lines.append(f"| {key} | {_fmt(first.get(key, ''))} | {_fmt(last[key])} |")
    accuracy = eval_accuracy(stage.get("eval", {}))
    lines += ["", f"Verifiable-task accuracy (greedy, `tulu3.eval.generate` on add_eval.jsonl): "
                  f"**{_fmt(accuracy) if accuracy is not None else 'n/a'}**", ""]
    run_dir = Path(stage["run_dir"])
    for plot in PLOTS[name]:
        png = run_dir / f"{plot}.png"
        if png.exists():
            lines.append(f"![{name} {plot}]({png.relative_to(out)})")
    return lines + [""]


def write_report(out: Path, stages: list[dict], curation: dict, export: dict,
                 seconds: float) -> Path:
    lines = ["# tulu3 demo: SFT -> DPO -> RLVR on CPU", "",
             f"Total wall time {seconds / 60:.1f} min. Every stage ran through `torchrun` + "
             "`python -m tulu3.train` on CPU processes (gloo).", "",
             "## Curation", "",
             f"8-gram decontamination (4-grams here: the prompts are short) of the SFT split "
             f"against the held-out eval split: {curation['removed_rows']} of "
             f"{curation['train_rows']} rows removed, {curation['planted_removed']} of "
             f"{curation['planted']} planted eval prompts among them. The RLVR task's SFT chats "
             "(single-digit additions, two answer styles, only one verifiable) are added after "
             "curation: its eval set (add_eval.jsonl) is in-distribution by design.", ""]
    for stage in stages:
        lines += _stage_section(out, stage)
    accuracies = [eval_accuracy(s.get("eval", {})) for s in stages]
    lines += ["## Eval accuracy by stage", "", "| after | accuracy |", "|---|---|"]
    lines += [f"| {s['stage']} | {_fmt(a) if a is not None else 'n/a'} |"
              for s, a in zip(stages, accuracies, strict=True)]
    lines += ["", "## HF export", ""]
    if "skipped" in export:
        lines.append(f"Export written; logits not compared ({export['skipped']}).")
    else:
        lines.append(f"The final checkpoint exported to `{export['hf']}` loads in transformers; "
                     f"max |logits difference| vs tulu3 = {export['max_abs_diff']:.2e} "
                     f"(logit scale {export['logit_scale']:.2f}).")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
