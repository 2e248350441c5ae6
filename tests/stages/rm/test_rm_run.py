"""``--stage rm`` end to end: train on synthetic preferences, export, score, reload.

Launch 1 (one process): the tiny reward model trains with launch/recipes/tiny-rm-scratch.yaml
on the synthetic preference set (``rm.jsonl``: count, reversal, single-digit sums) from a seeded
random HF Llama, with held-out evaluation on ``rm_eval.jsonl`` (metrics, plots, a checkpoint
marked ``head: scalar``), then ``tulu3.stages.rm.export`` writes the checkpoint as an HF
LlamaForSequenceClassification.
Launch 2 (two processes): the checkpoint loads through ``load_scalar_weights`` at PP2 and at DP2,
``score_conversations`` scores the held-out conversations, and the PP2 model is exported again
in-process. The parent scores the same conversations with transformers: equal to 1e-5.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from tulu3.config import load_config
from tulu3.demo.data import RM_EVAL_PAIRS
from tulu3.metrics import read_metrics
from tulu3.testing import run_distributed_test

pytestmark = pytest.mark.distributed

SCRATCH_RECIPE = str(Path(__file__).resolve().parents[3] / "launch/recipes/tiny-rm-scratch.yaml")
RECIPE = load_config(SCRATCH_RECIPE)
STEPS, PAIRS_PER_STEP, MAX_LEN = (RECIPE.train.max_steps, RECIPE.train.global_batch,
                                  RECIPE.data.max_len)


def _data(root: Path) -> dict[str, str]:
    from tulu3.data.tokenizer import load_tokenizer
    from tulu3.demo.data import make_tiny_data
    from tulu3.model.presets import PRESETS
    from tulu3.testing import tiny_hf_llama

    data = make_tiny_data(root / "data", n_sft=8, n_dpo=8, n_rlvr=8, n_eval=8)
    vocab = load_tokenizer(data["tokenizer"]).vocab_size
    tiny_hf_llama(dataclasses.replace(PRESETS["tiny"], vocab=vocab), seed=0) \
        .save_pretrained(root / "hf")
    data["hf"] = str(root / "hf")
    return data


def _train_and_export(data: dict, run_dir: str, hf_out: str) -> dict:
    from tulu3.stages.rm.export import export_checkpoint
    from tulu3.train import run_stage

    paths = {"data.tokenizer": data["tokenizer"], "data.train": data["rm"],
             "data.eval": data["rm_eval"], "data.cache_dir": Path(run_dir).parent / "cache",
             "model.load": data["hf"], "train.run_dir": run_dir}
    cfg = load_config(SCRATCH_RECIPE, [f"{k}={v}" for k, v in paths.items()])
    record = run_stage(cfg, "rm")
    ckpt = Path(run_dir) / "checkpoints" / f"step_{STEPS}"
    export_checkpoint(ckpt, hf_out, tokenizer_dir=data["tokenizer"])
    return record


def _conversations(path: str) -> tuple[list[list[dict]], list[str]]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    convs = [conv for row in rows for conv in (row["chosen"], row["rejected"])]
    return convs, [row["source"] for row in rows]


def _score_at_layouts(ckpt: str, tokenizer: str, convs: list, hf_out: str) -> dict:
    from megatron.core import parallel_state as ps

    from tulu3.data.tokenizer import load_tokenizer
    from tulu3.parallel.groups import ProcessGroups
    from tulu3.parallel.init import init_model_parallel
    from tulu3.parallel.layout import make_layout
    from tulu3.stages.rm.export import export_reward_model
    from tulu3.stages.rm.score import load_reward_model, score_conversations

    tok = load_tokenizer(tokenizer)
    out = {}
    for name, overrides in (("PP2", ["parallel.pp=2"]), ("DP2", [])):
        cfg = load_config(None, overrides)
        layout = make_layout(cfg, 2)
        init_model_parallel(layout, seed=1)
        groups = ProcessGroups.current()
        chunks, shape = load_reward_model(ckpt, cfg.model, layout, groups)
        out[name] = score_conversations(chunks, tok, convs, layout, groups, max_len=MAX_LEN,
                                        micro_batch=16)
        if name == "PP2":
            export_reward_model(chunks, shape, layout, hf_out, tok.pad_id,
                                eos_token_id=tok.eos_id, groups=groups)
        ps.destroy_model_parallel()
    return out


def _hf_scores(model: torch.nn.Module, tokenizer: str, convs: list) -> torch.Tensor:
    """transformers' scores: right-padded batches with the config's pad id."""
    from tulu3.data.chat_template import tokenize_conversation
    from tulu3.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    pad = model.config.pad_token_id
    ids = [tokenize_conversation(c, tok)[0] for c in convs]
    width = max(map(len, ids))
    batch = torch.full((len(ids), width), pad, dtype=torch.long)
    for row, seq in enumerate(ids):
        batch[row, :len(seq)] = torch.tensor(seq)
    with torch.no_grad():
        return model(batch, attention_mask=(batch != pad).long()).logits[:, 0]


def _exported_model(run: dict) -> torch.nn.Module:
    """The exported reward model in transformers (loaded once per module)."""
    if "hf_model" not in run:
        from transformers import LlamaForSequenceClassification

        run["hf_model"] = LlamaForSequenceClassification.from_pretrained(run["hf"]).float().eval()
    return run["hf_model"]


def _exported_scores(run: dict) -> torch.Tensor:
    """transformers' scores of the held-out conversations (computed once per module)."""
    if "hf_scores" not in run:
        run["hf_scores"] = _hf_scores(_exported_model(run), run["data"]["tokenizer"],
                                      run["convs"])
    return run["hf_scores"]


def _accuracy(scores: torch.Tensor, sources: list[str], kind: str | None = None) -> float:
    wins = (scores[0::2] > scores[1::2]).tolist()
    picked = [w for w, s in zip(wins, sources, strict=True) if kind is None or s == kind]
    return sum(picked) / len(picked)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("rm_run")
    data = _data(root)
    run_dir, hf_out, hf_again = root / "run", root / "rm_hf", root / "rm_hf_pp2"
    record = run_distributed_test(_train_and_export, 1, data, str(run_dir), str(hf_out),
                                  timeout_s=1200)[0]  # ~4 min alone on 2 cores
    convs, sources = _conversations(data["rm_eval"])
    assert len(sources) == RM_EVAL_PAIRS
    ckpt = str(run_dir / "checkpoints" / f"step_{STEPS}")
    scores = run_distributed_test(_score_at_layouts, 2, ckpt, data["tokenizer"], convs,
                                  str(hf_again))[0]
    return {"root": root, "data": data, "run_dir": run_dir, "hf": hf_out, "hf_again": hf_again,
            "record": record, "convs": convs, "sources": sources, "scores": scores}


def test_metrics_plots_and_checkpoint(run: dict) -> None:
    records = read_metrics(run["run_dir"] / "metrics.jsonl")
    assert len(records) == STEPS
    for key in ("loss", "accuracy", "margin", "reward_mean", "reward_std", "chosen",
                "rejected", "pairs", "grad_norm", "lr"):
        assert key in records[0], key
    assert records[0]["pairs"] == PAIRS_PER_STEP
    assert "reward_sq" not in records[0]
    evals = [r for r in records if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [STEPS // 4 * k for k in (1, 2, 3, 4)]
    assert (run["run_dir"] / "rm.png").exists() and (run["run_dir"] / "loss.png").exists()
    meta = json.loads((run["run_dir"] / "checkpoints" / f"step_{STEPS}" / "tulu3.json")
                      .read_text())
    assert meta["head"] == "scalar"


def test_export_equals_transformers(run: dict) -> None:
    config = json.loads((run["hf"] / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["num_labels"] == 1
    from tulu3.data.tokenizer import load_tokenizer

    tok = load_tokenizer(run["data"]["tokenizer"])
    assert config["pad_token_id"] == tok.pad_id != tok.eos_id
    assert _exported_model(run).config.num_labels == 1
    hf = _exported_scores(run)
    assert float(hf.abs().max()) > 0.1  # scores that carry information
    for layout, scores in run["scores"].items():
        diff = float((torch.tensor(scores) - hf).abs().max())
        assert diff < 1e-5, f"{layout}: tulu3 and transformers scores differ by {diff}"
    # The in-process export (PP2 ranks) writes the same tensors as the streaming one.
    from tulu3.checkpoint.hf_io import HFReader

    a, b = HFReader(run["hf"]), HFReader(run["hf_again"])
    assert a.names() == b.names() and "score.weight" in a.names()
    assert "lm_head.weight" not in a.names()
    assert all(torch.equal(a.read(k), b.read(k)) for k in a.names())


def _untrained_scores(run: dict) -> torch.Tensor:
    """The same held-out pairs scored by the starting point (random backbone, initial head)."""
    from transformers import LlamaForSequenceClassification

    from tulu3.model.scalar_head import initial_value_head

    pad = json.loads((run["hf"] / "config.json").read_text())["pad_token_id"]
    model = LlamaForSequenceClassification.from_pretrained(
        run["data"]["hf"], num_labels=1, pad_token_id=pad).float().eval()
    with torch.no_grad():
        model.score.weight.copy_(initial_value_head(model.config.hidden_size))
    return _hf_scores(model, run["data"]["tokenizer"], run["convs"])


def test_held_out_accuracy(run: dict) -> None:
    """Held-out accuracy above 0.9, from chance before training (scored in transformers).

    The held-out split is ``rm_rows(256, 1, held_out=True)``: its additions use only operand
    pairs that no training pair has (``synthetic.SMALL_HELD_OUT``), so the reward model must check
    sums it never saw; its reversal lists are almost all new; the count prompts (8) recur with
    other missing numbers. Measured at these settings (1,000 steps of 64 fresh pairs, lr 3e-3,
    from the seeded random HF Llama): 0.97 overall (add 0.91, reverse 1.0, count 1.0); the
    trainer's held-out accuracy 0.80 / 0.94 / 0.99 / 0.97 at steps 250 / 500 / 750 / 1,000.
    Fewer pairs do not reach 0.9: 1,000 steps of 32 pairs ended at 0.85-0.88 (reversal is learned
    late, and not at the same step every run).
    """
    hf = _exported_scores(run)
    sources = run["sources"]
    before = _untrained_scores(run)
    records = read_metrics(run["run_dir"] / "metrics.jsonl")
    curve = [r["eval/accuracy"] for r in records if "eval/accuracy" in r]
    summary = {"before": _accuracy(before, sources), "after": _accuracy(hf, sources),
               "trainer_eval": curve,
               **{kind: (_accuracy(before, sources, kind), _accuracy(hf, sources, kind))
                  for kind in sorted(set(sources))}}
    print(summary)
    assert abs(summary["after"] - curve[-1]) <= 1.0 / RM_EVAL_PAIRS + 1e-9, summary
    assert summary["after"] > 0.9 and curve[-1] > 0.9, summary
    assert summary["before"] < 0.75 and curve[0] < curve[-1], summary
    for kind in ("synthetic_add", "synthetic_count", "synthetic_reverse"):
        assert summary[kind][1] >= 0.85, (kind, summary)


def _eval_with_reward_model(policy: str, data: str, tokenizer: str, rm: str) -> dict | None:
    from tulu3 import eval as tulu3_eval

    return tulu3_eval.evaluate(tulu3_eval.parse_args([
        "--ckpt", policy, "--data", data, "--tokenizer", tokenizer, "--pp", "2",
        "--max-new-tokens", "6", "--reward-model", rm, "--show", "100", "--workers", "1"]))


def test_eval_scores_with_the_reward_model(run: dict) -> None:
    """``tulu3.eval --reward-model``: every generated response gets the reward model's score,
    equal to transformers' LlamaForSequenceClassification on the same conversation (1e-5).
    The policy is the seeded random tiny Llama; the RM is the trained checkpoint (PP2)."""
    data = run["data"]
    ckpt = str(run["run_dir"] / "checkpoints" / f"step_{STEPS}")
    report = run_distributed_test(_eval_with_reward_model, 2, data["hf"], data["rlvr"],
                                  data["tokenizer"], ckpt)[0]
    rows = report["samples"]
    assert len(rows) == 8 and all("messages" not in row for row in rows)
    convs = [[{"role": "user", "content": row["prompt"]},
              {"role": "assistant", "content": row["response"]}] for row in rows]
    hf = _hf_scores(_exported_model(run), data["tokenizer"], convs)
    ours = torch.tensor([row["rm_score"] for row in rows], dtype=torch.float64)
    assert float((ours - hf).abs().max()) < 1e-5, (ours, hf)
    stats = report["reward_model"]
    assert stats["path"] == ckpt and stats["all"]["n"] == 8
    assert abs(stats["all"]["mean"] - float(ours.mean())) < 1e-6


def _preference_report(rm: str, data: str, tokenizer: str) -> dict | None:
    from tulu3.eval import preferences as eval_preferences

    return eval_preferences.evaluate(eval_preferences.parse_args([
        "--rm", rm, "--data", data, "--tokenizer", tokenizer, "--max-len", str(MAX_LEN),
        "--scores"]))


def test_eval_preferences_per_source(run: dict) -> None:
    """``tulu3.eval.preferences`` at DP2 on the held-out pairs: per-source accuracy and margin
    equal to the same pairs scored by transformers from the export (scores to 1e-5)."""
    data = run["data"]
    report = run_distributed_test(_preference_report, 2, str(run["run_dir"]), data["rm_eval"],
                                  data["tokenizer"])[0]
    hf = _exported_scores(run).double()
    ours = torch.tensor([[p["chosen"], p["rejected"]] for p in report["scores"]],
                        dtype=torch.float64).flatten()
    assert float((ours - hf).abs().max()) < 1e-5
    sources = run["sources"]
    for kind in (*sorted(set(sources)), None):
        got = report["accuracy"]["all" if kind is None else kind]
        picked = [i for i, s in enumerate(sources) if kind is None or s == kind]
        gaps = (hf[0::2] - hf[1::2])[picked]
        assert got["n"] == len(picked)
        assert got["accuracy"] == _accuracy(hf, sources, kind)
        assert abs(got["margin"] - float(gaps.mean())) < 1e-4


def test_eval_preferences_bad_rows(tmp_path: Path) -> None:
    """Malformed preference rows are refused with file:line before any model is built."""
    from tulu3.data.examples import RowError
    from tulu3.eval.preferences import main, read_pairs

    good = {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "b"}]}
    cases = {"no_rejected": {"chosen": good["chosen"]},
             "ends_with_user": {**good, "rejected": good["rejected"][:1]}}
    for name, bad in cases.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(RowError, match=f"{name}.jsonl:2"):
            read_pairs(str(path))
        # The rows are read first: the error comes back before the (missing) model is looked at.
        assert main(["--rm", str(tmp_path / "missing"), "--data", str(path)]) == 2


def test_recipes() -> None:
    """tiny-rm loads; the 8B recipe carries open-instruct's Tülu 3 RM settings and a layout that
    fits one 8-GPU node (docs/tulu3.md: lr 3e-6, 1 epoch, max_token_length 2048)."""
    from tulu3.parallel.layout import make_layout

    make_layout(load_config("launch/recipes/tiny-rm.yaml"), 4)
    make_layout(RECIPE, 1)
    cfg = load_config("launch/recipes/llama3.1-8b-rm.yaml")
    assert (cfg.model.preset, cfg.model.dtype) == ("llama3.1-8b", "bf16")
    assert "Tulu-3-8B-SFT" in cfg.model.load
    assert (cfg.optim.lr, cfg.optim.schedule, cfg.optim.warmup) == (3e-6, "linear", 0.0)
    assert (cfg.optim.eps, cfg.optim.beta2, cfg.optim.weight_decay) == (1e-5, 0.999, 0.01)
    assert (cfg.train.epochs, cfg.data.max_len, cfg.train.global_batch) == (1, 2048, 256)
    assert (cfg.rm.margin, cfg.rm.center_coef) == (0.0, 0.0)
    make_layout(cfg, 8)
