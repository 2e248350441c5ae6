"""ScalarHeadModel: equal to transformers' LlamaForSequenceClassification, loads every kind of
checkpoint, and trains the Bradley-Terry loss identically at every parallel layout.

One single-process launch carries the oracle checks and the reference run; multi-process launches
compare TP2xPP2, TP2xDP2 with sequence parallelism, PP2xDP2 and DP2 with it (fp32, 1e-5: loss of
each step, every gradient after step one, every weight after step two).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from parity_harness import max_diff, merge

from tulu3.parallel.groups import ProcessGroups
from tulu3.testing import run_distributed_test

if TYPE_CHECKING:
    from tulu3.config import ModelConfig
    from tulu3.model.presets import LlamaShape
    from tulu3.parallel.layout import ParallelLayout

VOCAB = 500
PAD = VOCAB - 1  # never drawn as a real token
TOL = 1e-5
FOUR_RANKS = {
    "TP2xPP2": ["parallel.tp=2", "parallel.pp=2"],
    "TP2xDP2 sequence parallel": ["parallel.tp=2", "parallel.sequence_parallel=true"],
    "PP2xDP2": ["parallel.pp=2"],
}


def _shape():
    from tulu3.config import load_config
    from tulu3.model.presets import resolve_shape

    return resolve_shape(load_config(None, [f"model.vocab={VOCAB}"]).model)


def _pairs(count: int = 8, seed: int = 5) -> list[tuple[list[int], list[int]]]:
    """Preference pairs: a shared random prompt, two random replies of different lengths."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        prompt = torch.randint(0, PAD, (int(torch.randint(3, 9, (1,), generator=gen)),),
                               generator=gen).tolist()
        replies = [torch.randint(0, PAD, (int(torch.randint(2, 10, (1,), generator=gen)),),
                                 generator=gen).tolist() for _ in range(2)]
        out.append((prompt + replies[0], prompt + replies[1]))
    return out


def _micro_batch(pairs: list, first_index: int) -> dict:
    """Packed rows of 32 tokens: pair k's chosen is sequence 2k, its rejected 2k + 1."""
    from tulu3.data.packing import collate_sequences

    seqs = [(ids, ids) for pair in pairs for ids in pair]
    ids = [first_index + k for k in range(len(pairs)) for _ in range(2)]
    return collate_sequences(seqs, ids, 32, True, PAD)


def _train(world: int, hf_dir: str, overrides: list[str], steps: int = 2) -> dict:
    """Two RM steps at a layout from the same HF weights; global-layout results (rank-local)."""
    from megatron.core import parallel_state as ps
    from parity_harness import _collect

    from tulu3.config import load_config
    from tulu3.model.presets import resolve_shape
    from tulu3.model.scalar_head import build_scalar_chunks, load_scalar_weights
    from tulu3.optim import build_optimizer
    from tulu3.parallel.ddp import wrap_ddp
    from tulu3.parallel.init import init_model_parallel
    from tulu3.parallel.layout import make_layout
    from tulu3.stages.rm.stage import RMStage
    from tulu3.step import train_step

    # lr 1e-4: Adam divides by |grad|, so gradient rounding (~1e-7 relative) becomes weight
    # differences proportional to lr; at 1e-3 they reach ~1.4e-5 on some elements.
    cfg = load_config(None, [f"model.vocab={VOCAB}", "optim.lr=1e-4", "optim.warmup=0",
                             "optim.schedule=constant", "rm.margin=0.3", "rm.center_coef=0.05",
                             *overrides])
    layout = make_layout(cfg, world)
    init_model_parallel(layout, seed=1234)
    shape = resolve_shape(cfg.model)
    chunks = build_scalar_chunks(cfg.model, layout, ProcessGroups.current())
    load_scalar_weights(hf_dir, chunks, shape, ProcessGroups.current())
    ddp = wrap_ddp(chunks, layout)
    optimizer, scheduler = build_optimizer(cfg, ddp, total_steps=10)
    ddp[0].config.grad_scale_func = optimizer.scale_loss
    stage = RMStage(cfg.rm.margin, cfg.rm.center_coef)
    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    pairs = _pairs()
    mine = list(range(dp_rank * len(pairs) // dp, (dp_rank + 1) * len(pairs) // dp))
    micro = [_micro_batch([pairs[i] for i in mine[k:k + 2]], mine[k])
             for k in range(0, len(mine), 2)]
    losses, accuracy, grads = [], [], {}
    for step in range(steps):
        metrics = train_step(ddp, optimizer, scheduler, micro, stage, layout)
        losses.append(metrics["loss"])
        accuracy.append(metrics["accuracy"])
        if step == 0:
            grads = _collect(ddp, lambda p: p.main_grad)
    weights = _collect(ddp, lambda p: p.detach())
    tp_rank = ps.get_tensor_model_parallel_rank()
    head = {"grad": grads.get("value_head.weight"), "weight": weights.get("value_head.weight")}
    ps.destroy_model_parallel()
    keep = dp_rank == 0
    return {"loss": losses, "accuracy": accuracy, "grads": grads if keep else {},
            "weights": weights if keep else {}, "tp_rank": tp_rank, "head": head}


def _scores(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, None)


def _hf_classifier(shape: LlamaShape, path: Path) -> torch.nn.Module:
    """transformers' sequence classifier (random score head and norms, pad id set), saved."""
    from transformers import LlamaForSequenceClassification

    from tulu3.testing import hf_llama_config

    torch.manual_seed(11)
    hf_cls = LlamaForSequenceClassification(hf_llama_config(shape, num_labels=1,
                                                            pad_token_id=PAD)).float().eval()
    with torch.no_grad():
        for name, param in hf_cls.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    hf_cls.save_pretrained(path)
    return hf_cls


def _padded_tokens() -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of 14 tokens holding sequences of 14, 9 and 4 tokens then PAD; their sequence ids."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, PAD, (3, 14), generator=gen)
    lengths = [14, 9, 4]
    seq_ids = torch.full_like(tokens, -1)
    for row, n in enumerate(lengths):
        tokens[row, n:] = PAD
        seq_ids[row, :n] = row
    return tokens, seq_ids


def _head_in_place_of_output_layer(model: torch.nn.Module) -> dict:
    """What replaces the LM output layer: parameter names, checkpoint keys, the head's TP mark."""
    return {"params": [n for n, _ in model.named_parameters()],
            "sharded_keys": sorted(model.sharded_state_dict()),
            "head_tp_attr": getattr(model.value_head.weight, "tensor_model_parallel", False)}


def _scores_against_transformers(model: torch.nn.Module, hf_cls: torch.nn.Module,
                                 tokens: torch.Tensor, seq_ids: torch.Tensor) -> dict:
    """Per-position and pooled (last token of each sequence) scores: ours vs transformers'."""
    from tulu3.model.scalar_head import sequence_scores

    ours = _scores(model, tokens)
    with torch.no_grad():
        hidden = hf_cls.model(tokens).last_hidden_state
        per_position = hidden @ hf_cls.score.weight.T
        pooled = hf_cls(tokens).logits[:, 0]
    return {"position_diff": float((ours - per_position[..., 0]).abs().max()),
            "pooled_diff": float((sequence_scores(ours, seq_ids) - pooled).abs().max()),
            "scale": float(pooled.abs().max())}


def _rm_checkpoint_round_trip(model: torch.nn.Module, model_cfg: ModelConfig,
                              layout: ParallelLayout, shape: LlamaShape, ckpt: Path,
                              tokens: torch.Tensor) -> dict:
    """A reward-model checkpoint (head: scalar) loads back with the head: identical scores."""
    from tulu3.checkpoint.format import make_meta, save_model, write_meta
    from tulu3.model.scalar_head import build_scalar_chunks, load_scalar_weights

    with torch.no_grad():
        model.value_head.weight.mul_(-3.0)
    before = _scores(model, tokens)
    save_model([model], ckpt)
    write_meta(ckpt, make_meta(shape, 1, 1, 1, "fp32", head="scalar"))
    (fresh,) = build_scalar_chunks(model_cfg, layout, ProcessGroups.current())
    load_scalar_weights(ckpt, [fresh], shape, ProcessGroups.current())
    fresh.eval()
    return {"rm_ckpt_diff": float((_scores(fresh, tokens) - before).abs().max()),
            "rm_ckpt_scale": float(before.abs().max())}


def _save_policy(model_cfg: ModelConfig, layout: ParallelLayout, shape: LlamaShape,
                 ckpt: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A policy (LM head) from random HF weights, saved as a checkpoint with head: lm; returns
    (the megatron policy, the HF model)."""
    from tulu3.checkpoint.format import make_meta, save_model, write_meta
    from tulu3.model import hf_mapping
    from tulu3.model.build import build_model_chunks
    from tulu3.testing import tiny_hf_llama

    hf_lm = tiny_hf_llama(shape, seed=4)
    (policy,) = build_model_chunks(model_cfg, layout, ProcessGroups.current())
    hf_mapping.load_hf_into_chunk(policy, hf_lm.state_dict().__getitem__, shape, 0, 1)
    save_model([policy], ckpt)
    write_meta(ckpt, make_meta(shape, 1, 1, 1, "fp32"))
    return policy, hf_lm


def _scalar_model_from_policy(model_cfg: ModelConfig, layout: ParallelLayout,
                              shape: LlamaShape, ckpt: Path, policy: torch.nn.Module) -> dict:
    """A policy checkpoint into a ScalarHeadModel: backbone loaded, LM head ignored, head
    initialised (not left as it was)."""
    from tulu3.model.scalar_head import build_scalar_chunks, init_value_head, load_scalar_weights

    (value,) = build_scalar_chunks(model_cfg, layout, ProcessGroups.current())
    with torch.no_grad():
        value.value_head.weight.fill_(7.0)  # must be re-initialised, not left as is
    load_scalar_weights(ckpt, [value], shape, ProcessGroups.current())
    backbone = dict(policy.named_parameters())
    backbone_diff = max(float((p - backbone[n]).abs().max())
                        for n, p in value.named_parameters() if n != "value_head.weight")
    expected = value.value_head.weight.detach().clone()
    init_value_head(value)
    return {"backbone_diff": backbone_diff,
            "head_is_init": bool(torch.equal(expected, value.value_head.weight)),
            "head_std": float(expected.std())}


def _lm_model_loads(policy: torch.nn.Module, lm_ckpt: Path, rm_ckpt: Path) -> dict:
    """The policy checkpoint still loads into the LM model (value_head never stored there); an
    RM checkpoint does not pretend to be a policy."""
    from tulu3.checkpoint.format import load_model

    load_model([policy], lm_ckpt)
    try:
        load_model([policy], rm_ckpt)
        return {"lm_from_rm": "loaded"}
    except ValueError as err:  # ConversionError
        return {"lm_from_rm": f"{type(err).__name__}: {err}"}


def _single(root: str) -> dict:
    """Oracle checks and checkpoint round trips in one process; the reference training run."""
    from megatron.core import parallel_state as ps

    from tulu3.config import load_config
    from tulu3.model.scalar_head import build_scalar_chunks, load_scalar_weights
    from tulu3.parallel.init import init_model_parallel
    from tulu3.parallel.layout import make_layout

    cfg = load_config(None, [f"model.vocab={VOCAB}"])
    layout = make_layout(cfg, 1)
    init_model_parallel(layout, seed=1)
    shape = _shape()
    root_dir = Path(root)
    hf_cls = _hf_classifier(shape, root_dir / "hf_cls")
    (model,) = build_scalar_chunks(cfg.model, layout, ProcessGroups.current())
    out = _head_in_place_of_output_layer(model)
    assert load_scalar_weights(root_dir / "hf_cls", [model], shape, ProcessGroups.current()) == "hf"
    model.eval()
    tokens, seq_ids = _padded_tokens()
    out.update(_scores_against_transformers(model, hf_cls, tokens, seq_ids))
    out.update(_rm_checkpoint_round_trip(model, cfg.model, layout, shape, root_dir / "rm_ckpt",
                                         tokens))
    policy, hf_lm = _save_policy(cfg.model, layout, shape, root_dir / "lm_ckpt")
    out.update(_scalar_model_from_policy(cfg.model, layout, shape, root_dir / "lm_ckpt", policy))
    out.update(_lm_model_loads(policy, root_dir / "lm_ckpt", root_dir / "rm_ckpt"))
    hf_lm.save_pretrained(root_dir / "hf_lm")
    ps.destroy_model_parallel()
    out["train"] = _train(1, str(root_dir / "hf_lm"), [])
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("scalar_head")
    result = run_distributed_test(_single, 1, str(root))[0]
    result["root"] = str(root)
    return result


def test_scores_equal_transformers_sequence_classifier(single: dict) -> None:
    assert single["scale"] > 0.05, single  # a head that outputs ~0 would prove nothing
    assert single["position_diff"] < TOL, single
    assert single["pooled_diff"] < TOL, single


def test_no_lm_output_layer(single: dict) -> None:
    assert single["params"][-1] == "value_head.weight"
    assert not any("output_layer" in n for n in single["params"])
    assert "value_head.weight" in single["sharded_keys"]
    assert not any(k.startswith("output_layer") for k in single["sharded_keys"])
    assert single["head_tp_attr"] is False  # replicated: counted once in the grad norm


def test_checkpoints_load(single: dict) -> None:
    assert single["rm_ckpt_scale"] > 0.05
    assert single["rm_ckpt_diff"] == 0.0, single
    assert single["backbone_diff"] == 0.0, single
    assert single["head_is_init"], single
    shape = _shape()
    assert abs(single["head_std"] - (shape.hidden + 1) ** -0.5) < 0.05, single
    assert "head 'scalar'" in single["lm_from_rm"], single["lm_from_rm"]


def test_training_moves(single: dict) -> None:
    loss = single["train"]["loss"]
    assert loss[1] < loss[0], loss


def _check(name: str, per_rank: list[dict], single: dict) -> None:
    want = single["train"]
    for got in per_rank:
        for step, (a, b) in enumerate(zip(got["loss"], want["loss"], strict=True)):
            assert abs(a - b) <= TOL * max(1.0, abs(b)), f"{name} step {step}: {a} vs {b}"
        assert got["accuracy"] == want["accuracy"], name
    diff, where = max_diff(merge(per_rank, "grads"), merge([want], "grads"))
    assert diff <= TOL, f"{name}: gradient of {where} differs by {diff}"
    diff, where = max_diff(merge(per_rank, "weights"), merge([want], "weights"))
    assert diff <= TOL, f"{name}: weight {where} differs by {diff} after two steps"
    heads = [r["head"] for r in per_rank if r["head"]["grad"] is not None]
    for head in heads[1:]:  # every TP/DP rank of the last stage: the same replicated head
        assert torch.equal(head["grad"], heads[0]["grad"]), name
        assert torch.equal(head["weight"], heads[0]["weight"]), name


def _run_all(world: int, hf_dir: str, layouts: list[list[str]]) -> list[dict]:
    return [_train(world, hf_dir, overrides) for overrides in layouts]


@pytest.mark.distributed
def test_four_rank_layouts_equal_single_process(single: dict) -> None:
    hf_dir = str(Path(single["root"]) / "hf_lm")
    results = run_distributed_test(_run_all, 4, 4, hf_dir, list(FOUR_RANKS.values()))
    for index, name in enumerate(FOUR_RANKS):
        _check(name, [rank[index] for rank in results], single)


@pytest.mark.distributed
def test_dp2_equals_single_process(single: dict) -> None:
    hf_dir = str(Path(single["root"]) / "hf_lm")
    results = run_distributed_test(_run_all, 2, 2, hf_dir, [[]])
    _check("DP2", [rank[0] for rank in results], single)

