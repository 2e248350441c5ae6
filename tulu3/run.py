"""Wire a stage to the shared trainer: tokenizer -> model -> loop -> optimizer -> fit."""

from __future__ import annotations

from typing import Any

from megatron.core import parallel_state as ps

from tulu3.config import Config
from tulu3.stages.logprobs import VocabShard
from tulu3.trainer import Trainer


def build_sft_loop(trainer: Trainer, tokenizer: Any, chunks: list, vocab: int) -> Any:
    from tulu3.data.packing import collate_sft
    from tulu3.loops.supervised import SupervisedLoop
    from tulu3.stages.sft import SFTStage

    cfg = trainer.cfg
    stage = SFTStage(vocab_shard(vocab), cfg.sft.loss_reduction, cfg.model.fused_logprobs)
    return SupervisedLoop(cfg, "sft", tokenizer, chunks, trainer, stage, collate_sft,
                          trainer.layout)


def build_rm_loop(trainer: Trainer, tokenizer: Any, chunks: list, vocab: int) -> Any:
    from tulu3.data.packing import collate_dpo
    from tulu3.loops.supervised import SupervisedLoop
    from tulu3.stages.rm import RMStage

    cfg = trainer.cfg
    stage = RMStage(cfg.rm.margin, cfg.rm.center_coef)
    return SupervisedLoop(cfg, "dpo", tokenizer, chunks, trainer, stage, collate_dpo,
                          trainer.layout)


def build_dpo_loop(trainer: Trainer, tokenizer: Any, chunks: list, vocab: int) -> Any:
    from tulu3.loops.dpo import DPOLoop
    from tulu3.stages.dpo import DPOStage

    cfg, dpo = trainer.cfg, trainer.cfg.dpo
    stage = DPOStage(vocab_shard(vocab), dpo.loss, dpo.beta, dpo.gamma_beta_ratio,
                     dpo.label_smoothing, cfg.model.fused_logprobs)
    return DPOLoop(cfg, tokenizer, chunks, trainer, stage, trainer.layout)


def build_rlvr_loop(trainer: Trainer, tokenizer: Any, chunks: list, vocab: int) -> Any:
    from tulu3.loops.rlvr import RLVRLoop

    return RLVRLoop(trainer.cfg, tokenizer, chunks, trainer, vocab_shard(vocab), trainer.layout)


LOOPS = {"sft": build_sft_loop, "rm": build_rm_loop, "dpo": build_dpo_loop,
         "rlvr": build_rlvr_loop}
HEADS = {"rm": "scalar"}
"""The model head a stage trains when it is not the LM head (tulu3.model.scalar_head)."""


def vocab_shard(vocab: int) -> VocabShard:
    """This rank's vocabulary shard, with its TP group (passed explicitly into the math)."""
    return VocabShard(ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank(),
                      vocab)


def run_stage(cfg: Config, stage: str) -> dict:
    """Run one stage to its end; returns the last step's metrics record."""
    if stage not in LOOPS:
        raise SystemExit(f"tulu3.train: --stage {stage} is not available in this build")
    trainer = Trainer(cfg, stage)
    tokenizer = trainer.load_tokenizer()
    shape = trainer.resolve_shape(tokenizer.vocab_size)
    chunks = trainer.build_model(shape, HEADS.get(stage, "lm"))
    loop = LOOPS[stage](trainer, tokenizer, chunks, shape.vocab)
    trainer.build_optimizer(chunks, loop.total_steps())
    return trainer.fit(loop, chunks, shape, cfg.data.tokenizer)
