"""``OUT/report.md``: per stage the layout, steps, time, final metrics, eval accuracy and plots."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tulu3.metrics import read_metrics

# Metrics shown per stage (when the stage logs them).
SHOWN = {
    "sft": ("loss", "token_loss", "eval/token_loss", "grad_norm"),
    "dpo": ("loss", "rewards/accuracy", "rewards/margin", "rewards/chosen", "rewards/rejected",
            "eval/rewards/accuracy"),
    "rlvr": ("reward", "verified", "no_eos", "kl", "entropy", "response_length"),
}
PLOTS = {"sft": ("loss",), "dpo": ("loss", "dpo_rewards", "dpo_logps"),
         "rlvr": ("rlvr_reward", "rlvr_kl")}
EFFECT = {
    "sft": "SFT teaches the sums in two answer styles, half of its chats each: "
           "\"a + b = c. The answer is c.\" (verified: the gsm8k verifier reads the last number) "
           "and \"The answer is c = a + b.\" (not verified: its last number is b). Greedy "
           "decoding picks one style per prompt, so the accuracy is about the share of replies "
           "in the verified style that also have the right sum.",
    "dpo": "DPO trains on other preference pairs (dpo.jsonl: two-digit sums, counting, word "
           "reversal), not on this task. Its addition pairs are all in the verified style and "
           "differ only in the sum, so the chosen and the rejected reply share that style's "
           "tokens, while the answer-first style is in no pair. DPO's loss only asks the chosen "
           "reply to gain on the rejected one; where both lose probability (rewards/chosen < 0), "
           "the verified style can lose it with them. \"Why the accuracy changes after DPO\" "
           "below reads this run's numbers.",
    "rlvr": "RLVR (GRPO) samples replies to the task's prompts and rewards the verified ones: "
            "the verified style is the only one that earns a reward, so RLVR pushes its share, "
            "and with it the accuracy, up (how far in this run: the table at the end; a few "
            "steps move it little).",
}
"""What each stage does to the verifiable task (the demo's add_eval.jsonl), for the report."""


def answer_styles(report: dict[str, Any]) -> dict[str, int]:
    """Replies of a ``tulu3.eval`` report per answer style: ``verified`` ("... The answer is
    c."), ``answer_first`` ("The answer is c = a + b.") and ``other``."""
    counts = {"verified": 0, "answer_first": 0, "other": 0, "answer_first_right": 0}
    for row in report.get("samples") or []:
        text = str(row.get("response", "")).strip()
        style = ("answer_first" if text.startswith("The answer is") else
                 "verified" if "The answer is" in text else "other")
        counts[style] += 1
        first = re.match(r"The answer is (-?\d+)", text)
        if style == "answer_first" and first and first.group(1) == str(row.get("ground_truth")):
            counts["answer_first_right"] += 1  # the right sum, in the style not verified
    return counts


def _replies(stage: dict) -> int:
    return len(stage.get("eval", {}).get("samples") or [])


def dpo_effect(stages: list[dict]) -> list[str]:
    """This run's evidence for what DPO did to the task: the log-probability ratios of its last
    step and the reply styles before and after (empty without both SFT and DPO)."""
    by_name = {s["stage"]: s for s in stages}
    if not {"sft", "dpo"} <= set(by_name):
        return []
    last = read_metrics(Path(by_name["dpo"]["run_dir"]) / "metrics.jsonl")[-1]
    before, after = (answer_styles(by_name[n].get("eval", {})) for n in ("sft", "dpo"))
    shown = _replies(by_name["dpo"])
    lines = ["## Why the accuracy changes after DPO", ""]
    if isinstance(last.get("rewards/chosen"), float):
        moved = "both lost probability" if last["rewards/chosen"] < 0 else \
            "the chosen replies gained probability"
        lines.append(f"At DPO's last step rewards/chosen = {last['rewards/chosen']:.3g} and "
                     f"rewards/rejected = {_fmt(last.get('rewards/rejected', 'n/a'))} (beta x "
                     f"log-probability ratio to the SFT model): {moved}.")
    lines.append(f"Replies in the verified style: {before['verified']} after SFT, "
                 f"{after['verified']} after DPO (of {shown}); answer-first replies after DPO: "
                 f"{after['answer_first']}, {after['answer_first_right']} of them with the right "
                 "sum, which the verifier scores wrong (it reads the last number).")
    return lines + [""]


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
    styles = answer_styles(stage.get("eval", {}))
    lines += ["", f"Verifiable-task accuracy (greedy, `python -m tulu3.eval` on add_eval.jsonl): "
                  f"**{_fmt(accuracy) if accuracy is not None else 'n/a'}**; reply styles: "
                  f"{styles['verified']} verified style, {styles['answer_first']} answer-first, "
                  f"{styles['other']} other.", "", EFFECT[name], ""]
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
    lines += dpo_effect(stages)
    accuracies = [eval_accuracy(s.get("eval", {})) for s in stages]
    lines += ["## Eval accuracy by stage", "",
              "| after | accuracy | replies in the verified style |", "|---|---|---|"]
    for stage, accuracy in zip(stages, accuracies, strict=True):
        styles, replies = answer_styles(stage.get("eval", {})), _replies(stage)
        lines.append(f"| {stage['stage']} | {_fmt(accuracy) if accuracy is not None else 'n/a'} "
                     f"| {styles['verified']} of {replies} |")
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
