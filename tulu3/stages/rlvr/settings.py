"""RLVR settings checked before anything is built, and the run length.

Run length (:func:`run_length`): ``train.epochs`` over the prompts (drop-last: ``len // global
batch`` steps an epoch), or with ``rlvr.total_episodes`` open-instruct's ``total_episodes //
(prompts per step x samples per prompt)`` steps, over as many epochs as that takes (the Tülu 3
405B run: 400,000 // 1,856 = 215 steps; 7,500 RLVR-MATH prompts // 1,856 = 4 steps an epoch,
so 54 epochs).
"""

from __future__ import annotations

import torch

from tulu3.config import Config, ConfigError
from tulu3.parallel.layout import ParallelLayout


def run_length(cfg: Config, prompts: int) -> tuple[int, int]:
    """(steps, epochs over the ``prompts``) of the run, before ``train.max_steps``."""
    train, rl = cfg.train, cfg.rlvr
    per_epoch = prompts // train.global_batch
    if per_epoch == 0:
        raise ConfigError(f"data.train has {prompts} prompts, fewer than train.global_batch="
                          f"{train.global_batch}")
    if rl.total_episodes is None:
        return per_epoch * train.epochs, train.epochs
    steps = rl.total_episodes // (train.global_batch * rl.samples_per_prompt)
    return steps, -(-steps // per_epoch)


def validate_rlvr(cfg: Config, layout: ParallelLayout) -> None:
    """Raise ConfigError for RLVR settings that cannot run (before anything is built)."""
    rl, train = cfg.rlvr, cfg.train
    if rl.rollout_backend != "inprocess":
        raise ConfigError("rlvr.rollout_backend=vllm is not implemented in this build: "
                          "use rlvr.rollout_backend=inprocess (generation on the trainer's own "
                          "weights)")
    if rl.algo == "grpo" and rl.samples_per_prompt < 2:
        raise ConfigError("rlvr.algo=grpo needs rlvr.samples_per_prompt >= 2 (it normalizes "
                          "rewards within each prompt's group)")
    if rl.generation_tokens is not None and rl.generation_tokens <= rl.max_new_tokens:
        raise ConfigError(f"rlvr.generation_tokens={rl.generation_tokens} cannot hold a prompt "
                          f"and rlvr.max_new_tokens={rl.max_new_tokens} new tokens")
    if any(not s for s in rl.stop_strings):
        raise ConfigError("rlvr.stop_strings: an empty string would stop every sample at once")
    episodes = train.global_batch * rl.samples_per_prompt
    if rl.total_episodes is not None and rl.total_episodes < episodes:
        raise ConfigError(f"rlvr.total_episodes={rl.total_episodes} is less than one step's "
                          f"{episodes} episodes (train.global_batch x rlvr.samples_per_prompt)")
    if train.global_batch % layout.dp:
        raise ConfigError(f"train.global_batch={train.global_batch} prompts do not split over "
                          f"{layout.dp} data-parallel ranks")
    share = train.global_batch // layout.dp
    if share % rl.mini_batches:
        raise ConfigError(f"{share} prompts per DP rank do not split into rlvr.mini_batches="
                          f"{rl.mini_batches}")
    prompts = share // rl.mini_batches
    if prompts % train.micro_batch:
        raise ConfigError(f"a mini-batch has {prompts} prompts per DP rank, not a multiple of "
                          f"train.micro_batch={train.micro_batch} (an RLVR micro-batch is "
                          "train.micro_batch prompts with all their samples)")
    micro_batches = prompts // train.micro_batch
    if layout.vpp > 1 and micro_batches % layout.pp:
        raise ConfigError(f"interleaved pipelining needs micro-batches per mini-batch "
                          f"({micro_batches}) to be a multiple of parallel.pp")
    if layout.vpp > 1 and micro_batches == layout.pp and not torch.cuda.is_available():
        # As make_layout: megatron's all-warm-up interleaved path deadlocks on gloo.
        raise ConfigError(f"interleaved pipelining on CPU/gloo needs more micro-batches per "
                          f"mini-batch ({micro_batches}) than parallel.pp={layout.pp}")
