"""The parallel layout: one frozen description, validated once, asked by everything else.

:class:`ParallelLayout` holds the recipe's ``parallel.*`` sizes and switches under their own
names, with ``dp`` derived from the world size. It is the one source of what megatron is told
(:meth:`~ParallelLayout.megatron_init_args`, :meth:`~ParallelLayout.transformer_config_args`),
of how metrics and sequences are reduced and padded, of the layout a checkpoint records, and of
the ``--set`` lines that select it. The checks (:meth:`~ParallelLayout.check_model`,
:meth:`~ParallelLayout.check_spec`, :meth:`~ParallelLayout.check_batch`,
:meth:`~ParallelLayout.check_backend`) take plain values, so the planner (tulu3/planner) runs
the same rules on the layouts it enumerates that :func:`make_layout` runs on a recipe.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tulu3.config import ConfigError

if TYPE_CHECKING:
    from tulu3.config import Config, ParallelConfig

CHECKPOINT_KEYS = ("tp", "pp", "vpp", "dp", "cp")
"""The sizes a checkpoint's tulu3.json records under ``layout`` (with distributed_optimizer)."""
UNEVEN_KEYS = ("account_for_embedding_in_pipeline_split", "account_for_loss_in_pipeline_split")
"""The switches that count the embedding / the loss as one layer in the pipeline split."""


class LayoutError(ConfigError):
    """A parallel layout that cannot work; the message names the offending value."""


@dataclass(frozen=True)
class ParallelLayout:
    """World = tp x cp x dp x pp ranks (megatron's order tp-cp-ep-dp-pp); vpp chunks per pp rank.

    Field names are the recipe's ``parallel.*`` keys (and megatron's TransformerConfig names
    for the pipeline-split switches). Construction checks only that the sizes are >= 1 and
    divide the world; the model, spec, batch and backend checks are the ``check_*`` methods.
    """

    world_size: int
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    """Virtual pipeline stages (model chunks) per pipeline rank; > 1: interleaved 1F1B."""
    cp: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    account_for_embedding_in_pipeline_split: bool = False
    account_for_loss_in_pipeline_split: bool = False

    def __post_init__(self) -> None:
        for key in ("tp", "pp", "vpp", "cp"):
            if getattr(self, key) < 1:
                raise LayoutError(f"parallel.{key}={getattr(self, key)} must be >= 1")
        if self.world_size % self.model_parallel:
            raise LayoutError(f"world size {self.world_size} is not a multiple of tp x pp x cp "
                              f"= {self.tp} x {self.pp} x {self.cp} = {self.model_parallel}")

    @classmethod
    def from_config(cls, par: ParallelConfig, world_size: int) -> ParallelLayout:
        """The layout of the recipe's ``parallel`` section (unchecked beyond construction):
        every field but ``world_size`` is the config's field of the same name."""
        names = [f.name for f in dataclasses.fields(cls) if f.name != "world_size"]
        return cls(world_size=world_size, **{name: getattr(par, name) for name in names})

    # --- derived sizes --------------------------------------------------------------------

    @property
    def dp(self) -> int:
        """Data-parallel size: the ranks that read different data."""
        return self.world_size // self.model_parallel

    @property
    def model_parallel(self) -> int:
        """Ranks that hold one model replica: tp x pp x cp."""
        return self.tp * self.pp * self.cp

    @property
    def split_extra(self) -> int:
        """Units besides the transformer layers in the pipeline split (embedding, loss)."""
        return (int(self.account_for_embedding_in_pipeline_split)
                + int(self.account_for_loss_in_pipeline_split))

    @property
    def metric_copies(self) -> int:
        """Ranks of one replica's last pipeline stage that hold the same copy of a metric
        (every TP x CP rank computes the loss of the whole micro-batch: CP ranks from the output
        gathered over CP, tulu3.step)."""
        return self.tp * self.cp

    @property
    def pad_multiple(self) -> int:
        """Sequence lengths must divide by TP under sequence parallelism (and 2 x CP under CP:
        the load-balanced CP split cuts each sequence into 2 x cp chunks)."""
        multiple = self.tp if self.sequence_parallel else 1
        return multiple * (2 * self.cp if self.cp > 1 else 1)

    @property
    def micro_batch_multiple(self) -> int:
        """Micro-batches per schedule call must be a multiple of this (pp when interleaved)."""
        return self.pp if self.vpp > 1 else 1

    def micro_batches(self, global_batch: int, micro_batch: int) -> int:
        """Micro-batches per step on each DP rank (exact when :meth:`check_batch` passed)."""
        return global_batch // (micro_batch * self.dp)

    def chunk_ends(self, pp_rank: int) -> list[tuple[bool, bool]]:
        """``(pre_process, post_process)`` of each model chunk of pipeline rank ``pp_rank``:
        whether it holds the embedding (first virtual stage of the first rank) and the output
        layer (last virtual stage of the last rank), as megatron's is_pipeline_first/last_stage
        with ``vp_stage``."""
        return [(pp_rank == 0 and vp == 0, pp_rank == self.pp - 1 and vp == self.vpp - 1)
                for vp in range(self.vpp)]

    def chunk_layer_ranges(self, layers: int, pp_rank: int) -> list[range]:
        """Global transformer layer numbers of each model chunk of pipeline rank ``pp_rank``.

        Chunk ``vp`` of rank ``p`` is virtual stage ``vp * pp + p``; each holds
        (layers + split_extra) / (pp x vpp) units, the embedding taking one unit of the first
        virtual stage and the loss one of the last when counted (megatron's
        get_transformer_layer_offset / get_num_layers_to_build; valid after check_model)."""
        chunks = self.pp * self.vpp
        per = (layers + self.split_extra) // chunks
        embed = int(self.account_for_embedding_in_pipeline_split)
        loss = int(self.account_for_loss_in_pipeline_split)
        out = []
        for vp in range(self.vpp):
            stage = vp * self.pp + pp_rank
            start = stage * per - (embed if stage else 0)
            stop = (stage + 1) * per - embed - (loss if stage == chunks - 1 else 0)
            out.append(range(start, stop))
        return out

    # --- what megatron and checkpoints are told ----------------------------------------------

    def megatron_init_args(self) -> dict[str, Any]:
        """Keyword arguments of megatron's ``parallel_state.initialize_model_parallel``."""
        return {"tensor_model_parallel_size": self.tp,
                "pipeline_model_parallel_size": self.pp,
                "virtual_pipeline_model_parallel_size": self.vpp if self.vpp > 1 else None,
                "context_parallel_size": self.cp}

    def transformer_config_args(self) -> dict[str, Any]:
        """The parallel fields of megatron's ``TransformerConfig``."""
        return {**self.megatron_init_args(), "sequence_parallel": self.sequence_parallel,
                **{key: getattr(self, key) for key in UNEVEN_KEYS}}

    def checkpoint_record(self) -> dict[str, Any]:
        """The ``layout`` entry of a training checkpoint's trainer state."""
        return {**{key: getattr(self, key) for key in CHECKPOINT_KEYS},
                "distributed_optimizer": self.distributed_optimizer}

    def same_ranks(self, record: dict[str, Any]) -> bool:
        """Whether a checkpoint saved at ``record`` (:meth:`checkpoint_record`) had every rank
        where this layout has it (then per-rank state such as RNG streams carries over)."""
        return all(record[key] == getattr(self, key) for key in CHECKPOINT_KEYS)

    def overrides(self) -> list[str]:
        """``parallel.*=value`` recipe overrides that select this layout (for ``--set``); the
        pipeline-split switches only when on."""
        pairs = [f"parallel.{key}={getattr(self, key)}" for key in ("tp", "pp", "vpp", "cp")]
        pairs += [f"parallel.{key}={str(getattr(self, key)).lower()}"
                  for key in ("sequence_parallel", "distributed_optimizer")]
        return pairs + [f"parallel.{key}=true" for key in UNEVEN_KEYS if getattr(self, key)]

    # --- text ---------------------------------------------------------------------------

    def sizes_text(self, sep: str = "x") -> str:
        """``TP2xPP2xVPP2xCP2xDP4`` (VPP and CP only when > 1)."""
        parts = [f"TP{self.tp}", f"PP{self.pp}"]
        parts += [f"VPP{self.vpp}"] if self.vpp > 1 else []
        parts += [f"CP{self.cp}"] if self.cp > 1 else []
        return sep.join([*parts, f"DP{self.dp}"])

    def features(self) -> list[str]:
        """Short names of the switches that are on: SP, dist-opt."""
        return [name for name, on in (("SP", self.sequence_parallel),
                                      ("dist-opt", self.distributed_optimizer)) if on]

    def describe(self) -> str:
        extra = self.features()
        return self.sizes_text() + (f" ({', '.join(extra)})" if extra else "") + \
            f" on {self.world_size} ranks"

    # --- checks (plain values: the planner runs them without a Config) ------------------------

    def for_layers(self, layers: int) -> ParallelLayout:
        """The layout a model of ``layers`` layers runs at beside this one (PPO's value model):
        the same ranks, and the uneven split (embedding / loss counted as layers) only where that
        model needs it: a 32-layer value model splits evenly over the PP16 of a 126-layer
        policy, which needs the uneven split."""
        chunks = self.pp * self.vpp
        if self.split_extra and (layers + self.split_extra) % chunks and not layers % chunks:
            return dataclasses.replace(self, account_for_embedding_in_pipeline_split=False,
                                       account_for_loss_in_pipeline_split=False)
        return self

    def check_model(self, heads: int, kv_heads: int, layers: int) -> None:
        """TP divides the heads; the layers (+ embedding / loss) split over pp x vpp chunks."""
        if heads % self.tp:
            raise LayoutError(f"parallel.tp={self.tp} does not divide model.heads={heads}")
        if kv_heads % self.tp:
            raise LayoutError(f"parallel.tp={self.tp} does not divide model.kv_heads={kv_heads}")
        if self.vpp > 1 and self.pp == 1:
            raise LayoutError(f"parallel.vpp={self.vpp} needs parallel.pp > 1")
        extra = self.split_extra
        if extra and self.pp == 1:
            raise LayoutError("parallel.account_for_*_in_pipeline_split needs parallel.pp > 1")
        if (layers + extra) % (self.pp * self.vpp):
            counted = f"model.layers={layers}" + (f" + {extra} (embedding/loss)" if extra else "")
            raise LayoutError(f"parallel.pp x parallel.vpp = {self.pp} x {self.vpp} does not "
                              f"divide {counted}")

    def check_spec(self, spec: str) -> None:
        """What the layer spec (``model.spec``: te | torch | local) supports."""
        if self.sequence_parallel and self.tp == 1:
            raise LayoutError("parallel.sequence_parallel=true needs parallel.tp > 1")
        if self.cp > 1 and spec == "local":
            raise LayoutError(f"parallel.cp={self.cp} needs model.spec=torch or te (megatron's "
                              "local attention has no context parallelism)")
        if self.sequence_parallel and spec == "local":
            raise LayoutError("parallel.sequence_parallel=true needs model.spec=torch or te "
                              "(megatron's local norm does not support it)")

    def check_packing(self, spec: str, pack: bool, micro_batch: int) -> None:
        """Packed rows reach Transformer Engine as THD, one row per micro-batch, as Megatron-LM
        feeds it; its CP split of THD (per document) is not tulu3's row split, so refused."""
        if spec != "te" or not pack:
            return
        if micro_batch != 1:
            raise LayoutError(f"data.pack=true with model.spec=te needs train.micro_batch=1 "
                              f"(one packed THD row per micro-batch), got {micro_batch}")
        if self.cp > 1:
            raise LayoutError(f"data.pack=true with model.spec=te and parallel.cp={self.cp} is "
                              "not supported (TE splits THD per document); use model.spec=torch")

    def check_batch(self, global_batch: int, micro_batch: int) -> int:
        """The global batch splits into micro-batches over DP (a multiple of pp of them per DP
        rank when interleaved); returns the micro-batches per step on each DP rank."""
        per_step = micro_batch * self.dp
        if global_batch % per_step:
            raise LayoutError(f"train.global_batch={global_batch} is not divisible by "
                              f"train.micro_batch x dp = {micro_batch} x {self.dp}")
        micro_batches = global_batch // per_step
        if self.vpp > 1 and micro_batches % self.pp:
            raise LayoutError(f"interleaved pipelining needs micro-batches per step "
                              f"({micro_batches}) to be a multiple of parallel.pp={self.pp}")
        return micro_batches

    def check_backend(self, backend: str, micro_batches: int) -> None:
        """Limits of one torch.distributed backend (``gloo`` | ``nccl``)."""
        if backend == "gloo" and self.vpp > 1 and micro_batches == self.pp:
            # Measured: megatron's all-warm-up interleaved path (micro-batches == pp) deadlocks
            # on gloo (its p2p calls pair differently on the two ranks); 2 x pp runs and is exact.
            raise LayoutError(f"interleaved pipelining on gloo needs more micro-batches per step "
                              f"({micro_batches}) than parallel.pp={self.pp}: raise "
                              "train.global_batch or lower train.micro_batch")


def make_layout(cfg: Config, world_size: int) -> ParallelLayout:
    """Build and validate the layout for ``cfg`` on ``world_size`` ranks (raises LayoutError)."""
    from tulu3.model.presets import resolve_shape

    layout = ParallelLayout.from_config(cfg.parallel, world_size)
    shape = resolve_shape(cfg.model)
    layout.check_model(shape.heads, shape.kv_heads, shape.layers)
    layout.check_spec(cfg.model.spec)
    layout.check_packing(cfg.model.spec, cfg.data.pack, cfg.train.micro_batch)
    layout.check_batch(cfg.train.global_batch, cfg.train.micro_batch)
    return layout


def check_backend_limits(cfg: Config, layout: ParallelLayout, backend: str) -> None:
    """Limits of one backend, checked when the run starts (recipes are validated anywhere)."""
    layout.check_backend(backend, layout.micro_batches(cfg.train.global_batch,
                                                       cfg.train.micro_batch))
