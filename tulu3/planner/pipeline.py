"""Pipeline facts the planner needs: how layers split over stages, and how many micro-batches of
activations each stage holds at its peak under Megatron's 1F1B and interleaved schedules."""

from __future__ import annotations

from functools import lru_cache

from tulu3.parallel.layout import ParallelLayout


@lru_cache(maxsize=4096)
def split_kind(layers: int, pp: int, vpp: int) -> str | None:
    """How ``layers`` split over ``pp`` ranks x ``vpp`` chunks: "even", "uneven" or None (neither).

    "uneven" is Megatron's ``account_for_embedding_in_pipeline_split`` +
    ``account_for_loss_in_pipeline_split``: the embedding and the loss count as one layer each,
    so (layers + 2) must divide into pp x vpp chunks. Megatron-Bridge runs Llama 3.1 405B
    (126 layers) this way at PP8 VPP2 and PP16: 128 units = 16 chunks of 8.
    """
    chunks = pp * vpp
    if layers % chunks == 0:
        return "even"
    # Uneven needs a pipeline, and at least one transformer layer in the first and last chunk.
    if pp > 1 and (layers + 2) % chunks == 0 and (layers + 2) // chunks >= 2:
        return "uneven"
    return None


@lru_cache(maxsize=4096)
def chunk_layers(layers: int, pp: int, vpp: int, uneven: bool) -> tuple[tuple[int, ...], ...]:
    """Transformer layers per model chunk: ``result[rank][chunk]`` (chunk = virtual stage)."""
    units = layers + 2 if uneven else layers
    per = units // (pp * vpp)
    result = [[per] * vpp for _ in range(pp)]
    if uneven:
        result[0][0] -= 1  # the embedding takes one layer's place in the first virtual stage
        result[pp - 1][vpp - 1] -= 1  # the loss (output layer) takes one in the last
    return tuple(tuple(sizes) for sizes in result)


def rank_chunk_layers(layers: int, layout: ParallelLayout, rank: int) -> tuple[int, ...]:
    """Transformer layers of each model chunk of pipeline ``rank`` under ``layout``'s split
    (uneven when it counts the embedding and the loss)."""
    return chunk_layers(layers, layout.pp, layout.vpp, layout.split_extra > 0)[rank]


def inflight_passes(rank: int, pp: int, vpp: int, micro_batches: int) -> int:
    """Chunk forward passes whose activations ``rank`` holds at its peak (warm-up + 1).

    From megatron.core.pipeline_parallel.schedules.get_pp_rank_microbatches: 1F1B warms up with
    pp - rank - 1 forwards; interleaved with (pp - rank - 1) * 2 + (vpp - 1) * pp chunk forwards
    (microbatch_group_size_per_vp_stage = pp). For rank 0 that is pp + (pp - 1) / vpp stages'
    worth, Korthikanti et al.'s (1 + (p - 1) / (p m)) factor on the first stage.
    """
    total = micro_batches * vpp
    if pp == 1:
        return 1  # no pipeline: forward and backward of one micro-batch at a time
    if vpp == 1:
        warmup = pp - rank - 1
    else:
        warmup = (pp - rank - 1) * 2 + (vpp - 1) * pp
    return min(warmup + 1, total)


@lru_cache(maxsize=4096)
def peak_inflight_layers(sizes: tuple[int, ...], rank: int, pp: int, micro_batches: int) -> int:
    """Layer activations (in layer x micro-batch units) that ``rank`` holds at its peak.

    ``sizes`` are the rank's chunk sizes. The interleaved schedule runs forwards in groups of pp
    micro-batches per chunk (pass j uses chunk (j // pp) % vpp), so the live set is a window of
    consecutive passes; with unequal chunks (uneven split) take the heaviest window.
    """
    vpp = len(sizes)
    count = inflight_passes(rank, pp, vpp, micro_batches)
    if len(set(sizes)) == 1:
        return count * sizes[0]
    total = micro_batches * vpp
    order = [sizes[(j // pp) % vpp] for j in range(min(total, count + pp * vpp))]
    window = best = sum(order[:count])
    for start in range(1, len(order) - count + 1):  # slide the window one pass at a time
        window += order[start + count - 1] - order[start - 1]
        best = max(best, window)
    return best


def bubble_fraction(pp: int, vpp: int, micro_batches: int) -> float:
    """Idle fraction of the ideal time: (p - 1) / (m v) (Narayanan et al. 2021, interleaved)."""
    return (pp - 1) / (micro_batches * vpp)
