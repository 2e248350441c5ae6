"""``tulu3.train --dry-run``: the resolved recipe, its layout, and this rank's model built by
megatron on the meta device, in one process, with no GPU and no memory.

``WORLD_SIZE`` and ``RANK`` say which rank of which world to build (``WORLD_SIZE=256 RANK=255``
builds the last pipeline stage of a 256-GPU run). Megatron's process groups are created on
torch's ``fake`` backend (every collective a no-op), so megatron's own checks run exactly as on
the cluster: TransformerConfig (TE / FP8 / recompute / layout fields) and the model of that
rank's pipeline stage at full shape, parameters on the meta device. A combination megatron
refuses fails here, as a one-line error, instead of at launch.

Without Transformer Engine the ``te`` spec's config is still built and checked, but its modules
cannot be: the ``torch`` spec (the same parameters) stands in for them, and the output says so.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

from tulu3.config import Config, ConfigError
from tulu3.parallel.layout import ParallelLayout

_MOVES = (torch.Tensor.cuda, torch.Tensor.to)


def _meta_arg(arg: Any) -> Any:
    """A ``Tensor.to`` argument with its device made meta (a tensor argument: its dtype)."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype
    is_device = isinstance(arg, (str, torch.device)) or (isinstance(arg, int)
                                                        and not isinstance(arg, bool))
    return "meta" if is_device else arg


class MetaFactories(TorchFunctionMode):
    """Every tensor factory makes meta tensors, whatever device it names (Transformer Engine's
    modules ask for the current CUDA device explicitly). ``torch.device("meta")`` only fills a
    missing device, and it recognises the factories by identity while the CPU compat layer
    (tulu3/patches/cpu.py) wraps them: both the wrappers and the originals are matched here."""

    def __init__(self) -> None:
        super().__init__()
        known = _device_constructors()
        self.factories = set(known) | {getattr(f, "__wrapped__", f) for f in known}

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in self.factories:
            kwargs["device"] = "meta"
        elif func in _MOVES and args and getattr(args[0], "is_meta", False):
            # model.cuda() (build_model_chunks on a GPU machine) and .to(device): stay on meta,
            # dtype conversions still apply.
            if func is torch.Tensor.cuda:
                return args[0]
            kwargs.update({"device": "meta"} if "device" in kwargs else {})
            rest = [_meta_arg(a) for a in args[1:]]
            return func(args[0], *rest, **kwargs)
        return func(*args, **kwargs)


@contextmanager
def fake_world(rank: int, world_size: int) -> Iterator[None]:
    """This process as rank ``rank`` of ``world_size`` on torch's ``fake`` backend (collectives
    are no-ops); megatron's groups are torn down after."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from tulu3.parallel.init import destroy_model_parallel

    if dist.is_initialized():
        raise RuntimeError("a dry run needs a process without torch.distributed (no torchrun)")
    dist.init_process_group("fake", rank=rank, world_size=world_size, store=FakeStore())
    try:
        yield
    finally:
        destroy_model_parallel()
        dist.destroy_process_group()


@contextmanager
def rank_on_meta(cfg: Config, layout: ParallelLayout, rank: int, head: str = "lm"
                 ) -> Iterator[tuple[list[torch.nn.Module], Any, str]]:
    """Yields (chunks, ProcessGroups, note): rank ``rank``'s model chunks built by megatron with
    every parameter on the meta device, while its (fake) groups exist; ``note`` says when the
    torch spec stood in for te."""
    from tulu3.model.build import build_model_chunks, transformer_config
    from tulu3.model.scalar_head import ScalarHeadModel
    from tulu3.model.specs import has_transformer_engine
    from tulu3.parallel.groups import ProcessGroups
    from tulu3.parallel.init import init_model_parallel

    model_cfg, note = cfg.model, ""
    with fake_world(rank, layout.world_size):
        init_model_parallel(layout, seed=cfg.train.seed)
        groups = ProcessGroups.current()
        transformer_config(cfg.model, layout)  # the recipe's own config, te / fp8 included
        if cfg.model.spec == "te" and not has_transformer_engine():
            fp8_off = {f.name: f.default for f in dataclasses.fields(cfg.model)
                       if f.name.startswith("fp8")}  # the stand-in's shapes are the same
            model_cfg = dataclasses.replace(cfg.model, spec="torch", **fp8_off)
            note = " (te config checked; torch-spec modules stand in: no Transformer Engine here)"
        model_class = ScalarHeadModel if head == "scalar" else None
        with MetaFactories():
            chunks = build_model_chunks(model_cfg, layout, groups,
                                        **({"model_class": model_class} if model_class else {}))
        yield chunks, groups, note


def describe_rank(cfg: Config, layout: ParallelLayout, rank: int, head: str) -> str:
    """One line: this rank's position, its chunks' layers and parameters, built on meta."""
    from tulu3.model.presets import resolve_shape

    try:
        with rank_on_meta(cfg, layout, rank, head) as (chunks, groups, note):
            pass
    except (AssertionError, ValueError, RuntimeError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"megatron refuses this configuration at rank {rank}: {first}") from None
    params = [p for c in chunks for p in c.parameters()]
    off_meta = [p for p in params if p.device.type != "meta"]
    if off_meta:
        raise ConfigError(f"dry run: {len(off_meta)} parameters were not built on the meta device")
    count = sum(p.numel() for p in params)
    nbytes = sum(p.numel() * p.element_size() for p in params)
    layers = resolve_shape(cfg.model).layers
    parts = []
    for (pre, post), span in zip(layout.chunk_ends(groups.pp_rank),
                                 layout.chunk_layer_ranges(layers, groups.pp_rank), strict=True):
        ends = ["embedding"] * pre + ["output"] * post
        parts.append(f"layers {span.start}-{span.stop - 1}" + "".join(f" + {e}" for e in ends))
    return (f"# megatron, rank {rank} (TP{groups.tp_rank} PP{groups.pp_rank} DP{groups.dp_rank}):"
            f" TransformerConfig and model built on the meta device{note}: "
            f"{'; '.join(parts)}; {count / 1e9:.3f} B parameters ({nbytes / 2**30:.2f} GiB)")


def dry_run(cfg: Config, stage: str, head: str = "lm") -> str:
    """The resolved config and layout as text, then rank ``$RANK``'s model built on meta."""
    import yaml

    from tulu3.model.presets import param_count, resolve_shape
    from tulu3.parallel.layout import make_layout

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is not a rank of WORLD_SIZE={world}")
    if cfg.model.vocab is None and cfg.data.tokenizer and os.path.exists(cfg.data.tokenizer):
        from tulu3.data.tokenizer import load_tokenizer

        cfg.model.vocab = load_tokenizer(cfg.data.tokenizer).vocab_size
    layout = make_layout(cfg, world)
    shape = resolve_shape(cfg.model)
    micro_batches = layout.micro_batches(cfg.train.global_batch, cfg.train.micro_batch)
    lines = [f"# tulu3.train --stage {stage} (dry run: nothing was started)",
             yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(),
             f"# layout: {layout.describe()}",
             f"# model: {shape.layers} layers, hidden {shape.hidden}, "
             f"{param_count(shape) / 1e6:.2f} M parameters; spec {cfg.model.spec}",
             f"# micro-batches per step per DP rank: {micro_batches}",
             describe_rank(cfg, layout, rank, head)]
    return "\n".join(lines)
