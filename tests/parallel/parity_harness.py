"""Shared pieces of the parallel parity tests: run N training steps at a layout, collect
losses, gradients and weights in megatron's global (TP1) layout for comparison.

:func:`run_layout` does it for SFT; other stages build the same model and optimizer with
:func:`setup_layout` and train their own stage and batches with :func:`train_steps`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state as ps
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from tulu3.config import Config, load_config
from tulu3.data.packing import has_packed_rows
from tulu3.model import hf_mapping
from tulu3.model.build import build_model_chunks
from tulu3.model.presets import resolve_shape
from tulu3.model.scalar_head import build_scalar_chunks, initial_value_head
from tulu3.optim import build_optimizer
from tulu3.parallel.ddp import unwrap, wrap_ddp
from tulu3.parallel.groups import ProcessGroups
from tulu3.parallel.init import init_model_parallel
from tulu3.parallel.layout import ParallelLayout, make_layout
from tulu3.stages.base import Stage
from tulu3.stages.logprobs import VocabShard
from tulu3.stages.sft import SFTStage
from tulu3.step import run_schedule, train_step
from tulu3.testing import tiny_hf_llama

VOCAB = 500  # not a multiple of 128 x TP: vocabulary padding is exercised


def examples(count: int = 8, seed: int = 7) -> list[dict]:
    """Random sequences of different lengths with a masked prompt part."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for index in range(count):
        length = int(torch.randint(6, 17, (1,), generator=gen))
        tokens = torch.randint(0, VOCAB, (length,), generator=gen)
        labels = torch.cat([tokens[1:], torch.tensor([-100])])
        labels[: length // 3] = -100
        out.append({"tokens": tokens, "labels": labels, "index": index})
    return out


def collate(items: list[dict]) -> dict:
    """Right-padded micro-batch in tulu3's batch format."""
    seq = max(len(i["tokens"]) for i in items)
    batch = len(items)
    tokens = torch.zeros(batch, seq, dtype=torch.long)
    labels = torch.full((batch, seq), -100, dtype=torch.long)
    seq_ids = torch.full((batch, seq), -1, dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item["tokens"])
        tokens[row, :n] = item["tokens"]
        labels[row, :n] = item["labels"]
        seq_ids[row, :n] = row
    positions = torch.arange(seq).expand(batch, seq).contiguous()
    return {"tokens": tokens, "labels": labels, "position_ids": positions, "seq_ids": seq_ids,
            "example_ids": torch.tensor([i["index"] for i in items])}


def collate_packed(items: list[dict], max_len: int = 40) -> dict:
    """The same sequences packed first-fit into rows of ``max_len`` (positions restart at every
    document, ``seq_ids`` tell documents apart): what tulu3.data.packing lays out."""
    rows: list[list[int]] = []
    for index, item in enumerate(items):
        fits = [r for r in rows if sum(len(items[i]["tokens"]) for i in r)
                + len(item["tokens"]) <= max_len]
        if not fits:
            rows.append([])
            fits = [rows[-1]]
        fits[0].append(index)
    seq = max(sum(len(items[i]["tokens"]) for i in row) for row in rows)
    batch = {"tokens": torch.zeros(len(rows), seq, dtype=torch.long),
             "labels": torch.full((len(rows), seq), -100, dtype=torch.long),
             "position_ids": torch.zeros(len(rows), seq, dtype=torch.long),
             "seq_ids": torch.full((len(rows), seq), -1, dtype=torch.long)}
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            n = len(items[i]["tokens"])
            for key, value in (("tokens", items[i]["tokens"]), ("labels", items[i]["labels"]),
                               ("position_ids", torch.arange(n)), ("seq_ids", i)):
                batch[key][r, start:start + n] = value
            start += n
    batch["example_ids"] = torch.tensor([item["index"] for item in items])
    return batch


@dataclass
class Setup:
    """This rank's model, optimizer and vocabulary shard at one layout, ready to train."""

    cfg: Config
    layout: ParallelLayout
    ddp: list
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler
    shard: VocabShard
    tp_rank: int
    dp_rank: int
    dp: int


def setup_layout(world: int, overrides: list[str], micro_batch: int = 1,
                 global_batch: int = 8, scalar_head: bool = False) -> Setup:
    """The tiny Llama from the same random HF weights at the layout in ``overrides`` (lr 1e-3,
    constant), wrapped in DDP with its AdamW; initialises model parallelism. ``scalar_head``:
    the reward / value model instead (:class:`ScalarHeadModel`, its head's fixed initial
    weight, the same at every layout)."""
    cfg = load_config(None, [f"model.vocab={VOCAB}", "optim.lr=1e-3", "optim.warmup=0",
                             "optim.schedule=constant", f"train.global_batch={global_batch}",
                             f"train.micro_batch={micro_batch}", *overrides])
    layout = make_layout(cfg, world)
    init_model_parallel(layout, seed=1234)
    shape = resolve_shape(cfg.model)
    hf_state = tiny_hf_llama(shape, seed=0).state_dict()
    build = build_model_chunks
    if scalar_head:  # no lm_head; score.weight is the head (hf_mapping.SCALAR_HEAD)
        build = build_scalar_chunks
        hf_state["score.weight"] = initial_value_head(shape.hidden)
    chunks = build(cfg.model, layout, ProcessGroups.current())
    tp_rank = ps.get_tensor_model_parallel_rank()
    for chunk in chunks:
        hf_mapping.load_hf_into_chunk(chunk, hf_state.__getitem__, shape, tp_rank, layout.tp)
    ddp = wrap_ddp(chunks, layout)
    optimizer, scheduler = build_optimizer(cfg, ddp, total_steps=10)
    ddp[0].config.grad_scale_func = optimizer.scale_loss
    shard = ProcessGroups.current().vocab_shard(VOCAB)
    return Setup(cfg, layout, ddp, optimizer, scheduler, shard, tp_rank,
                 ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())


def train_steps(setup: Setup, stage: Stage, micro: list[dict], steps: int) -> dict:
    """Train ``steps`` steps on this rank's micro-batches, then tear model parallelism down.

    Returns {"loss": [...], "grads": {name: tensor}, "weights": {name: tensor}} in the global
    layout on DP rank 0 of every (tp, pp) position (gradients after step one; none with the
    distributed optimizer); the caller merges ranks with :func:`merge`.
    """
    losses, grads = [], {}
    for step in range(steps):
        metrics = train_step(setup.ddp, setup.optimizer, setup.scheduler, micro, stage,
                             setup.layout)
        losses.append(metrics["loss"])
        if step == 0 and not setup.layout.distributed_optimizer:
            grads = _collect(setup.ddp, lambda p: p.main_grad)
    weights = _collect(setup.ddp, lambda p: p.detach())
    ps.destroy_model_parallel()
    keep = setup.dp_rank == 0
    return {"loss": losses, "grads": grads if keep else {}, "weights": weights if keep else {},
            "tp_rank": setup.tp_rank}


def run_layout(world: int, overrides: list[str], steps: int = 2, micro_batch: int = 1,
               global_batch: int = 8) -> dict:
    """Train ``steps`` SFT steps at the layout in ``overrides``; :func:`train_steps`' results.
    With ``data.pack=true`` in ``overrides`` the same sequences arrive packed
    (:func:`collate_packed`, four to a micro-batch)."""
    setup = setup_layout(world, overrides, micro_batch, global_batch)
    stage = SFTStage(setup.shard, setup.cfg.sft.loss_reduction, setup.cfg.model.fused_logprobs)
    mine = examples(global_batch)[setup.dp_rank::setup.dp]
    if setup.cfg.data.pack:  # four sequences per micro-batch, several to a row
        micro = [collate_packed(mine[i:i + 4]) for i in range(0, len(mine), 4)]
        assert any(has_packed_rows(mb["seq_ids"]) for mb in micro)
    else:
        micro = [collate(mine[i:i + micro_batch]) for i in range(0, len(mine), micro_batch)]
    return train_steps(setup, stage, micro, steps)


def gradients(setup: Setup, stage: Stage, micro: list[dict]) -> dict:
    """One forward + backward of ``micro`` (no optimizer step: the weights stay), as
    :func:`train_steps` returns it: {"loss": [loss], "grads": ..., "tp_rank": ...}."""
    for chunk in setup.ddp:
        chunk.zero_grad_buffer()
    metrics = run_schedule(setup.ddp, micro, stage, setup.layout)
    grads = _collect(setup.ddp, lambda p: p.main_grad) if setup.dp_rank == 0 else {}
    return {"loss": [metrics["loss"]], "grads": grads, "tp_rank": setup.tp_rank}


def _collect(ddp: list, get) -> dict[str, torch.Tensor]:
    out = {}
    for chunk in ddp:
        model = unwrap(chunk)
        names = hf_mapping.chunk_global_names(model)
        for name, param in model.named_parameters():
            out[names[name]] = get(param).float().clone()
    return out


def merge(results: list[dict], key: str) -> dict[str, torch.Tensor]:
    """Unshard per-rank pieces (rank order = TP order within a stage) into global tensors."""
    pieces: dict[str, dict[int, torch.Tensor]] = {}
    for result in results:
        for name, tensor in result[key].items():
            pieces.setdefault(name, {})[result["tp_rank"]] = tensor
    merged = {}
    for name, by_rank in pieces.items():
        rule, _ = hf_mapping.match_megatron(name)
        merged[name] = hf_mapping.unshard(rule, [by_rank[r] for r in sorted(by_rank)])
    return merged


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    worst = max(((float((a[k] - b[k]).abs().max()), k) for k in a), default=(0.0, ""))
    return worst
