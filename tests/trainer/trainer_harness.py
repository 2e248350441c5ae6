"""Shared set-up for trainer tests: tiny data in a temp dir and short SFT runs."""

from __future__ import annotations

from pathlib import Path

from tulu3.config import load_config
from tulu3.demo.data import make_tiny_data
from tulu3.metrics import read_metrics


def tiny_data(root: Path) -> dict[str, str]:
    """Tokenizer + splits, and ``hf``: a random tiny HF Llama every layout starts from."""
    import dataclasses

    from tulu3.data.tokenizer import load_tokenizer
    from tulu3.model.presets import PRESETS
    from tulu3.testing import tiny_hf_llama

    data = make_tiny_data(root / "data", n_sft=96, n_dpo=48, n_rlvr=32, n_eval=16, n_rm=8)
    vocab = load_tokenizer(data["tokenizer"]).vocab_size
    shape = dataclasses.replace(PRESETS["tiny"], vocab=vocab)
    tiny_hf_llama(shape, seed=0).save_pretrained(root / "hf")
    data["hf"] = str(root / "hf")
    return data


def sft_overrides(data: dict[str, str], run_dir: Path, *extra: str) -> list[str]:
    return [f"data.tokenizer={data['tokenizer']}", f"data.train={data['sft']}",
            f"data.cache_dir={run_dir.parent / 'cache'}", "data.max_len=64", "model.preset=tiny",
            f"model.load={data['hf']}",
            "train.global_batch=8", "train.micro_batch=2", "train.max_steps=6",
            f"train.run_dir={run_dir}", "train.plots=false", "optim.lr=3e-3",
            "optim.warmup=1", "data.eval=null", *extra]


def run_sft(overrides: list[str]) -> list[float]:
    """Run an SFT stage in this (already distributed) process; returns the logged losses."""
    from tulu3.train import run_stage

    cfg = load_config("launch/recipes/tiny-sft.yaml", overrides)
    run_stage(cfg, "sft")
    return losses(Path(cfg.train.run_dir))


def run_many(runs: list[list[str]]) -> list[list[float] | str]:
    """Several runs in one launch; a run that raises returns its error text."""
    out: list[list[float] | str] = []
    for overrides in runs:
        try:
            out.append(run_sft(overrides))
        except BaseException as err:  # noqa: BLE001 - the test inspects the message
            out.append(f"{type(err).__name__}: {err}")
    return out


def losses(run_dir: Path) -> list[float]:
    path = run_dir / "metrics.jsonl"
    return [r["loss"] for r in read_metrics(path)] if path.exists() else []
