"""Which stored piece goes to which file, and which rank reads it: the converters' plan, computed
from the model shape and layout alone (no tensors), so it can be checked for 405B on a laptop.

``hf_to_megatron`` and ``reshard`` write one chunk per TP shard of every global tensor, in
:func:`~tulu3.checkpoint.format.disk_plan` order, into ``__0_N.distcp`` files of
``FILE_BYTES`` of payload each (:class:`~tulu3.checkpoint.dcp_io.DistWriter`). A trainer rank
at the same TP reads exactly the chunks of its TP index for the layers of its model chunks
(:meth:`ParallelLayout.chunk_layer_ranges`, megatron's uneven split included), plus the
embedding on the first virtual stage and the final norm and output layer on the last.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tulu3.checkpoint.dcp_io import FILE_BYTES
from tulu3.checkpoint.format import disk_plan, disk_shape, sharded_key, tp_regions
from tulu3.checkpoint.hf_config import expected_hf_shapes
from tulu3.model.hf_mapping import global_shape, hf_names
from tulu3.model.presets import LlamaShape, padded_vocab
from tulu3.parallel.layout import ParallelLayout

EMBEDDING = "embedding.word_embeddings.weight"
LAST_STAGE = ("decoder.final_layernorm.weight", "output_layer.weight", "value_head.weight")


@dataclass(frozen=True)
class Piece:
    """One stored chunk: a TP shard of one layer's (or a non-layer) global tensor."""

    key: str
    """ShardedTensor key (layer tensors without the layer number)."""
    layer: int | None
    offsets: tuple[int, ...]
    """Offsets in the stored tensor (layer tensors: the layer axis first)."""
    sizes: tuple[int, ...]
    nbytes: int
    file: str
    """The ``__0_N.distcp`` file it is written to."""
    tp_index: int | None
    """The TP rank whose shard this is; None: replicated (every TP rank reads it)."""


def write_plan(shape: LlamaShape, tp: int, dtype: torch.dtype, head: str = "lm",
               file_bytes: int = FILE_BYTES) -> list[Piece]:
    """Every chunk the converters write for ``shape`` at TP ``tp``, in write order."""
    hf = expected_hf_shapes(shape, head)
    pieces, index, in_file = [], -1, file_bytes
    for rule, layer in disk_plan(shape, head):
        names = hf_names(rule, layer, shape.tied_embeddings)
        full = global_shape(rule, [hf[n] for n in names], padded_vocab(shape.vocab, tp))
        stored, prefix = disk_shape(tuple(full), layer, shape.layers)
        regions = tp_regions(rule, tuple(full), tp)
        for i, (offsets, sizes) in enumerate(regions):
            nbytes = math.prod(sizes) * dtype.itemsize
            if in_file >= file_bytes:  # DistWriter's rule: a new file once this one is full
                index, in_file = index + 1, 0
            in_file += nbytes
            owner = None if len(regions) == 1 else i % tp
            pieces.append(Piece(sharded_key(rule), layer, (*prefix, *offsets),
                                (*(1,) * len(prefix), *sizes), nbytes, f"__0_{index}.distcp",
                                owner))
    return pieces


def rank_pieces(pieces: list[Piece], shape: LlamaShape, layout: ParallelLayout, tp_rank: int,
                pp_rank: int) -> list[Piece]:
    """The pieces that rank (``tp_rank``, ``pp_rank``) of ``layout`` loads (the checkpoint saved
    at ``layout.tp``): its TP shards of its chunks' layers, the embedding on the first virtual
    stage, the final norm and head on the last (tied: the embedding there as the head)."""
    layers = {i for r in layout.chunk_layer_ranges(shape.layers, pp_rank) for i in r}
    ends = layout.chunk_ends(pp_rank)
    first, last = any(pre for pre, _ in ends), any(post for _, post in ends)
    keys = ({EMBEDDING} if first or (last and shape.tied_embeddings) else set())
    keys |= set(LAST_STAGE) if last else set()

    def wanted(p: Piece) -> bool:
        where = p.layer in layers if p.layer is not None else p.key in keys
        return where and p.tp_index in (None, tp_rank)

    return [p for p in pieces if wanted(p)]


def describe_plan(shape: LlamaShape, layout: ParallelLayout, dtype: torch.dtype,
                  head: str = "lm") -> list[str]:
    """One line per pipeline rank: its layers, the bytes one of its TP ranks reads and the files
    they lie in; then the totals (``hf_to_megatron --plan``: no tensor is read or written)."""
    pieces = write_plan(shape, layout.tp, dtype, head)
    lines = []
    for pp_rank in range(layout.pp):
        mine = rank_pieces(pieces, shape, layout, 0, pp_rank)
        spans = [f"{r.start}-{r.stop - 1}" for r in layout.chunk_layer_ranges(shape.layers,
                                                                               pp_rank)]
        files = sorted({p.file for p in mine}, key=lambda f: int(f[4:-7]))
        lines.append(f"PP rank {pp_rank}: layers {', '.join(spans)}; "
                     f"{sum(p.nbytes for p in mine) / 2**30:.2f} GiB per TP rank in "
                     f"{files[0]}..{files[-1]} ({len(files)} files)")
    total = sum(p.nbytes for p in pieces)
    lines.append(f"{len(pieces)} pieces, {total / 2**30:.1f} GiB in "
                 f"{len({p.file for p in pieces})} files")
    return lines
