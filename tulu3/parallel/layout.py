"""The parallel layout: one frozen description, validated once, asked by everything else."""

from __future__ import annotations

from dataclasses import dataclass

from tulu3.config import Config, ConfigError


class LayoutError(ConfigError):
    """A parallel layout that cannot work; the message names the offending value."""


@dataclass(frozen=True)
class ParallelLayout:
    """World = tp x cp x dp x pp ranks (megatron's order tp-cp-ep-dp-pp); vpp chunks per pp rank."""

    world_size: int
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    cp: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    account_for_embedding: bool = False
    account_for_loss: bool = False

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp * self.cp)

    @property
    def model_parallel(self) -> int:
        return self.tp * self.pp * self.cp

    def describe(self) -> str:
        parts = [f"TP{self.tp}", f"PP{self.pp}"]
        if self.vpp > 1:
            parts.append(f"VPP{self.vpp}")
        if self.cp > 1:
            parts.append(f"CP{self.cp}")
        parts.append(f"DP{self.dp}")
        extra = [name for name, on in (("SP", self.sequence_parallel),
                                       ("dist-opt", self.distributed_optimizer)) if on]
        return "x".join(parts) + (f" ({', '.join(extra)})" if extra else "") + \
            f" on {self.world_size} ranks"


def make_layout(cfg: Config, world_size: int) -> ParallelLayout:
    """Build and validate the layout for ``cfg`` on ``world_size`` ranks (raises LayoutError)."""
    from tulu3.model.presets import resolve_shape

    par = cfg.parallel
    for key in ("tp", "pp", "vpp", "cp"):
        if getattr(par, key) < 1:
            raise LayoutError(f"parallel.{key}={getattr(par, key)} must be >= 1")
    model_parallel = par.tp * par.pp * par.cp
    if world_size % model_parallel:
        raise LayoutError(f"world size {world_size} is not a multiple of tp x pp x cp = "
                          f"{par.tp} x {par.pp} x {par.cp} = {model_parallel}")
    shape = resolve_shape(cfg.model)
    if shape.heads % par.tp:
        raise LayoutError(f"parallel.tp={par.tp} does not divide model.heads={shape.heads}")
    if shape.kv_heads % par.tp:
        raise LayoutError(f"parallel.tp={par.tp} does not divide model.kv_heads={shape.kv_heads}")
    if par.vpp > 1 and par.pp == 1:
        raise LayoutError(f"parallel.vpp={par.vpp} needs parallel.pp > 1")
    extra = int(par.account_for_embedding_in_pipeline_split) + \
        int(par.account_for_loss_in_pipeline_split)
    if extra and par.pp == 1:
        raise LayoutError("parallel.account_for_*_in_pipeline_split needs parallel.pp > 1")
    if (shape.layers + extra) % (par.pp * par.vpp):
        counted = f"model.layers={shape.layers}" + (f" + {extra} (embedding/loss)" if extra else "")
        raise LayoutError(f"parallel.pp x parallel.vpp = {par.pp} x {par.vpp} does not divide "
                          f"{counted}")
    if par.sequence_parallel and par.tp == 1:
        raise LayoutError("parallel.sequence_parallel=true needs parallel.tp > 1")
    if par.cp > 1 and cfg.model.spec != "te":
        raise LayoutError(f"parallel.cp={par.cp} needs model.spec=te: megatron-core supports "
                          "context parallelism only in Transformer Engine attention")
    if par.sequence_parallel and cfg.model.spec == "local":
        raise LayoutError("parallel.sequence_parallel=true needs model.spec=torch or te "
                          "(megatron's local norm does not support it)")
    layout = ParallelLayout(world_size=world_size, tp=par.tp, pp=par.pp, vpp=par.vpp, cp=par.cp,
                            sequence_parallel=par.sequence_parallel,
                            distributed_optimizer=par.distributed_optimizer,
                            account_for_embedding=par.account_for_embedding_in_pipeline_split,
                            account_for_loss=par.account_for_loss_in_pipeline_split)
    per_step = cfg.train.micro_batch * layout.dp
    if cfg.train.global_batch % per_step:
        raise LayoutError(f"train.global_batch={cfg.train.global_batch} is not divisible by "
                          f"train.micro_batch x dp = {cfg.train.micro_batch} x {layout.dp}")
    micro_batches = cfg.train.global_batch // per_step
    if par.vpp > 1 and micro_batches % par.pp:
        raise LayoutError(f"interleaved pipelining needs micro-batches per step ({micro_batches}) "
                          f"to be a multiple of parallel.pp={par.pp}")
    return layout


def check_backend_limits(cfg: Config, layout: ParallelLayout, backend: str) -> None:
    """Limits of one backend, checked when the run starts (recipes are validated anywhere)."""
    micro_batches = cfg.train.global_batch // (cfg.train.micro_batch * layout.dp)
    if backend == "gloo" and layout.vpp > 1 and micro_batches == layout.pp:
        # Measured: megatron's all-warm-up interleaved path (micro-batches == pp) deadlocks on
        # gloo (its p2p calls pair differently on the two ranks); 2 x pp runs and is exact.
        raise LayoutError(f"interleaved pipelining on gloo needs more micro-batches per step "
                          f"({micro_batches}) than parallel.pp={layout.pp}: raise "
                          "train.global_batch or lower train.micro_batch")
