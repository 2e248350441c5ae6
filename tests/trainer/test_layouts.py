"""The tiny SFT run's loss curve is the same at every layout (fp32, to 1e-5), and it learns."""

from __future__ import annotations

from pathlib import Path

import pytest
from trainer_harness import run_many, sft_overrides, tiny_data

from tulu3.metrics import read_metrics
from tulu3.testing import run_distributed_test

pytestmark = pytest.mark.distributed

LAYOUTS_4 = {
    "TP2xPP2": ["parallel.tp=2", "parallel.pp=2"],
    "TP2xDP2 distributed optimizer": ["parallel.tp=2", "parallel.distributed_optimizer=true"],
    "PP2xVPP2xDP2": ["parallel.pp=2", "parallel.vpp=2", "train.micro_batch=1"],
    "TP2xPP2 packed": ["parallel.tp=2", "parallel.pp=2", "data.pack=true"],
}


@pytest.fixture(scope="module")
def curves(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[float]]:
    root = tmp_path_factory.mktemp("layouts")
    data = tiny_data(root)
    base = ["parallel.tp=1", "parallel.pp=1", "data.pack=false"]
    single = run_distributed_test(run_many, 1, [sft_overrides(data, root / "single", *base)])
    runs = [sft_overrides(data, root / name.replace(" ", "_"), *base, *extra)
            for name, extra in LAYOUTS_4.items()]
    four = run_distributed_test(run_many, 4, runs)
    result = {"TP1xPP1xDP1": single[0][0]}
    result.update(dict(zip(LAYOUTS_4, four[0], strict=True)))
    return result


@pytest.mark.parametrize("layout", list(LAYOUTS_4))
def test_loss_curve_equals_single_process(curves: dict, layout: str) -> None:
    want, got = curves["TP1xPP1xDP1"], curves[layout]
    assert isinstance(got, list), got
    assert len(got) == len(want) == 6
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), f"{layout} step {step + 1}: {a} vs {b}"


def test_learns_and_writes_outputs(tmp_path: Path) -> None:
    """A longer single-process run on the synthetic grammar: train and held-out loss fall."""
    data = tiny_data(tmp_path)
    run_dir = tmp_path / "run"
    extra = ["train.max_steps=24", "train.eval_every=8", "train.plots=true",
             f"data.eval={data['sft_eval']}", "parallel.tp=1", "parallel.pp=1",
             "train.save_every=0"]
    (result,) = run_distributed_test(run_many, 1, [sft_overrides(data, run_dir, *extra)])[0]
    assert isinstance(result, list), result
    records = read_metrics(run_dir / "metrics.jsonl")
    for key in ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s"):
        assert key in records[0], key
    token_loss = [r["token_loss"] for r in records]
    assert sum(token_loss[-3:]) < 0.7 * sum(token_loss[:3]), token_loss
    held_out = [r["eval/token_loss"] for r in records if "eval/token_loss" in r]
    assert len(held_out) == 3 and held_out[-1] < held_out[0], held_out
    assert (run_dir / "config.yaml").exists() and (run_dir / "loss.png").exists()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_24"
