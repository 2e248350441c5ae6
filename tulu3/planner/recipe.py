"""Predicted wall-clock of the whole Tülu 3 405B recipe (SFT -> DPO -> RLVR) on one cluster,
beside the published RLVR iteration (docs/PLANNER.md).

Each stage is planned as ``python -m tulu3.plan`` plans it (its fastest fitting layout) and
charged steps x step time; the step counts follow the recipes in launch/recipes/llama3.1-405b-*
(drop-last batches) and Tülu 3's run lengths. Sequences are counted at full length (no packing
gain, every response at max length): an upper bound on compute for SFT and DPO.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tulu3.planner.problem import Problem
from tulu3.planner.search import plan


@dataclass(frozen=True)
class StageRun:
    """One stage of the recipe: the planner's problem and how many rows / epochs it trains."""

    problem: Problem
    rows: int
    """Training rows (sft: conversations, dpo: pairs) or, for rlvr, episodes (prompts x samples)."""
    epochs: int = 1

    @property
    def steps(self) -> int:
        per_step = self.problem.global_batch * (self.problem.samples_per_prompt
                                                if self.problem.stage == "rlvr" else 1)
        return self.epochs * (self.rows // per_step)


SFT_ROWS = 939_344
"""allenai/tulu-3-sft-mixture, train split (dataset card)."""
DPO_ROWS = 360_924
"""allenai/llama-3.1-tulu-3-405b-preference-mixture (not re-checked here: the card we could
read gives only "100K-1M"; pass the real count)."""
RLVR_EPISODES = 400_000
"""open-instruct's 405B RLVR run (400k episodes, 1 sample per prompt)."""
PUBLISHED_RLVR = {"generation_s": 550, "training_s": 1500, "gpus": "232 training + 24 vLLM",
                  "source": "Tülu 3 405B (AI2 blog 2025-01-30: 256 H100s, vLLM TP16, ~35 min "
                            "a step) as quoted in issue 19"}


def tulu3_405b_stages(gpus: int, gpu: str = "h100-80gb", precision: str = "bf16",
                      sft_rows: int = SFT_ROWS, dpo_rows: int = DPO_ROWS,
                      episodes: int = RLVR_EPISODES) -> dict[str, StageRun]:
    """The three stages with the 405B recipes' sizes (launch/recipes/llama3.1-405b-*.yaml)."""
    common = {"model": "llama3.1-405b", "gpus": gpus, "gpu": gpu, "precision": precision}
    return {
        "sft": StageRun(Problem(stage="sft", seq_len=4096, global_batch=256, **common),
                        sft_rows, epochs=2),
        "dpo": StageRun(Problem(stage="dpo", seq_len=2048, global_batch=256, **common),
                        dpo_rows),
        # generation_tokens: the recipe's rlvr.generation_tokens (16 rows x 3,072 slots); all
        # of a DP rank's prompts in one prefill would not fit (tulu3/planner/prefill.py).
        "rlvr": StageRun(Problem(stage="rlvr", seq_len=2048 + 1024, response_len=1024,
                                 global_batch=1856, value_model="llama3.1-8b",
                                 generation_tokens=49152, **common),
                         episodes),
    }


def recipe_wall_clock(stages: dict[str, StageRun]) -> dict[str, Any]:
    """Per stage: layout, steps, step time and hours; the total; and the RLVR step split into
    generation and training beside the published iteration."""
    out: dict[str, Any] = {"stages": {}}
    total = 0.0
    for name, run in stages.items():
        best = plan(run.problem, top=1)[0]
        seconds = run.steps * best.time.total
        total += seconds
        out["stages"][name] = {"layout": best.describe(), "steps": run.steps,
                               "step_s": round(best.time.total, 2),
                               "hours": round(seconds / 3600, 2)}
        if name == "rlvr":
            generation = best.time.generation
            out["rlvr_iteration_s"] = {
                "predicted": {"generation_s": round(generation, 1),
                              "training_s": round(best.time.total - generation, 1)},
                "published": PUBLISHED_RLVR}
    out["total_hours"] = round(total / 3600, 2)
    out["total_days"] = round(total / 86400, 2)
    return out
