"""Shared pieces of the RLVR tests and the learning benchmark: synthetic rows, run overrides,
one RLVR run, and the SFT -> eval -> GRPO / PPO learning experiment.

The learning task: single-digit additions (operands 0..4) whose SFT answers come in two styles,
"a + b = c. The answer is c." and "The answer is c = a + b."; the gsm8k verifier reads the last
number, so only the first style is verified. Briefly SFT-ed, the tiny Llama gets the sums right
but picks either style; RLVR has to learn the style the verifier accepts.
"""

from __future__ import annotations

from pathlib import Path

from trainer_harness import tiny_data

from tulu3.config import load_config
from tulu3.data.loading import write_jsonl
from tulu3.data.synthetic import small_addition_rows
from tulu3.metrics import read_metrics

RECIPE = "launch/recipes/tiny-rlvr.yaml"
TRUTHS = ["x", "hang", "x", "raise", "x", "crash", "x", "x"]
"""Ground truths of the coin prompts (tests/stages/rlvr/rlvr_verifiers.py): three misbehave."""
SFT_STEPS = 150
ALGOS = {"grpo": ["rlvr.algo=grpo", "rlvr.kl_beta=0.01"],
         "ppo": ["rlvr.algo=ppo", "rlvr.kl_beta=0.05", "rlvr.ppo_epochs=2"]}
"""Learning runs: the tiny recipe (16 prompts x 4 samples, LR 2e-4) with these settings."""


def coin_rows() -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"What is {i} + {i + 1}?"}],
             "ground_truth": truth, "dataset": "coin"} for i, truth in enumerate(TRUTHS)]


def addition_rows(n: int, seed: int, answers: bool) -> list[dict]:
    return small_addition_rows(n, seed, answers)


def make_data(root: Path) -> dict[str, str]:
    """Tokenizer + random tiny HF Llama (trainer_harness) and the RLVR tests' data files."""
    data = tiny_data(root)
    folder = root / "data"
    data["coin"] = write_jsonl(coin_rows(), folder / "coin.jsonl")
    data["add_sft"] = write_jsonl(addition_rows(SFT_STEPS * 32, 1, True), folder / "add.jsonl")
    data["add_rlvr"] = write_jsonl(addition_rows(512, 2, False), folder / "add_rlvr.jsonl")
    data["add_eval"] = write_jsonl(addition_rows(40, 3, False), folder / "add_eval.jsonl")
    return data


def common(data: dict, run_dir: Path, *extra: str) -> list[str]:
    return [f"data.tokenizer={data['tokenizer']}", f"data.cache_dir={run_dir.parent / 'cache'}",
            f"train.run_dir={run_dir}", "train.save_every=0", "train.plots=false",
            "parallel.tp=1", "parallel.pp=1", "rlvr.verifier_workers=1", *extra]


def run_rlvr(overrides: list[str]) -> list[dict] | str:
    """One RLVR run from the tiny recipe; its metrics records, or the error text."""
    from tulu3.train import run_stage

    cfg = load_config(RECIPE, overrides)
    try:
        run_stage(cfg, "rlvr")
    except BaseException as err:  # noqa: BLE001 - the test shows the message
        return f"{type(err).__name__}: {err}"
    return read_metrics(Path(cfg.train.run_dir) / "metrics.jsonl")


def sft_checkpoint(root: Path, steps: int = SFT_STEPS) -> Path:
    return root / "sft" / "checkpoints" / f"step_{steps}"


def train_sft(data: dict, root: Path, steps: int = SFT_STEPS) -> Path:
    """The tiny SFT on the addition chats (batch 32, LR 3e-3) that the RLVR runs start from;
    returns its last checkpoint."""
    from tulu3.train import run_stage

    sft = load_config("launch/recipes/tiny-sft.yaml", common(
        data, root / "sft", f"data.train={data['add_sft']}", "data.eval=null",
        "data.max_len=64", "data.pack=false", f"model.load={data['hf']}",
        "train.global_batch=32", "train.micro_batch=32", f"train.max_steps={steps}",
        "train.epochs=1", "optim.lr=3e-3", "optim.warmup=5", "optim.schedule=constant",
        "sft.loss_reduction=mean"))
    run_stage(sft, "sft")
    return sft_checkpoint(root, steps)


def learn(data: dict, root: Path, seeds: tuple[int, ...] = (1234,), steps: int = 10) -> dict:
    """SFT, ``tulu3.eval`` of the SFT checkpoint (greedy), then GRPO and PPO runs from it for
    every seed (each ends with the loop's greedy eval: ``eval/verified``)."""
    from tulu3 import eval as tulu3_eval

    train_sft(data, root)
    before = tulu3_eval.evaluate(tulu3_eval.parse_args([
        "--ckpt", str(sft_checkpoint(root)), "--data", data["add_eval"],
        "--max-new-tokens", "20", "--workers", "1", "--tokenizer", data["tokenizer"]]))
    out: dict = {"before": before["summary"]["all"]["accuracy"], "report": before}
    for seed in seeds:
        for algo, extra in ALGOS.items():
            out[(algo, seed)] = run_rlvr(common(
                data, root / f"{algo}_{seed}", f"data.train={data['add_rlvr']}",
                f"data.eval={data['add_eval']}", f"model.load={sft_checkpoint(root)}",
                f"train.max_steps={steps}", f"train.seed={seed}", "train.plots=true",
                "train.micro_batch=16", "rlvr.max_new_tokens=20", "optim.lr=2e-4", *extra))
    return out
