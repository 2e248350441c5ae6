"""In-process generation on the trainer's own megatron chunks (any TP / PP / VPP / CP; no weight
copy).

    results = generate(chunks, prompts, SamplingParams(max_new_tokens=256, temperature=1.0,
                       seed=7), vocab=tokenizer.vocab_size, eos_ids=[tokenizer.eos_id])

Every rank of a model-parallel group (TP x PP x CP) calls it with the same prompts and gets the
same results; data-parallel replicas generate their own prompts independently.

Context parallelism: generation runs without it, on the same ranks. A forward of whole rows
without ``packed_seq_params`` never touches the CP group (RoPE follows the explicit position
ids; megatron's own per-CP-rank cut of the RoPE table, which TuluGPTModel discards, is switched
off in :func:`generation_mode`), so each CP rank runs as a CP1 model would. The CP ranks of a
replica act as extra generation data parallelism: CP rank r generates prompts r, r + cp,
r + 2 cp, ... and the finished responses are all-gathered over the CP group. A sample's tokens
depend only on (seed, its key) and its logits (tulu3/rollout/sampling.py), not on which rank or
micro-batch generated it, so the split changes no token.

How prompts are generated:
- They are cut into generation micro-batches, shortest prompts first, bounded by rows
  (``batch_size``) and by KV-cache slots (``max_tokens`` >= rows x (longest prompt + new
  tokens)); tulu3/rollout/decode.py holds one micro-batch's buffers (left padding, RoPE
  positions from each row's first real token, the mask that hides pads).
- ``in_flight`` micro-batches decode at once (default: one per pipeline stage), round-robin, so
  with PP > 1 every stage works on a different micro-batch (tulu3/rollout/pipeline.py).
- Prefill runs a micro-batch's padded prompts once, then each decode step feeds one token per
  row; its KV cache (tulu3/rollout/kv_cache.py) keeps every layer's keys and values, so a step
  costs one token's work. ``use_cache=False`` recomputes the whole sequence every step (the
  reference the tests compare against, and the path for specs without SDPAttention).
- A forward is one pass through the pipeline: each rank runs its chunks in order and hands the
  hidden states [s, b, h] to the next stage point-to-point (all ranks know s and b). The last
  stage applies its output-layer shard to the last position only (never [b, s, vocab] logits),
  gathers those [b, v_local] logits across TP, drops the padded vocabulary rows, picks the
  tokens (tulu3/rollout/sampling.py) and sends them to the other stages of its pipeline.
- Sequence parallelism is switched off for the length of the call (a decode step has one token
  per row, which TP cannot split), and the chunks run in eval mode under ``torch.no_grad``.
- A row stops at its first eos or when ``stop`` says so (stop strings, tulu3/rollout/stop.py); a
  micro-batch stops when every row has, or at ``max_new_tokens``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tulu3.parallel.ddp import unwrap
from tulu3.parallel.groups import ProcessGroups
from tulu3.rollout.decode import DecodeState, GenerationResult, StopCheck, split_micro_batches
from tulu3.rollout.kv_cache import attention_modules
from tulu3.rollout.pipeline import PipelinedDecoder
from tulu3.rollout.sampling import SamplingParams

__all__ = ["GenerationResult", "PipelineComm", "generate", "generation_mode"]

SEQUENCE_PARALLEL_FLAGS = ("sequence_parallel", "reduce_scatter_embeddings")


@dataclass(frozen=True)
class PipelineComm:
    """The groups the engine talks over: TP (logit gather) and PP (activations, tokens)."""

    tp_group: dist.ProcessGroup | None = None
    pp_group: dist.ProcessGroup | None = None
    prev_rank: int = 0
    """Global rank of the previous pipeline stage (wrapping around, as megatron's)."""
    next_rank: int = 0
    last_rank: int = 0
    """Global rank of the last pipeline stage of this rank's pipeline group."""
    pp: int = 1
    tp: int = 1
    cp_group: dist.ProcessGroup | None = None
    """The CP group: its ranks split the prompts and all-gather the responses."""
    cp: int = 1
    cp_rank: int = 0

    @classmethod
    def from_groups(cls, groups: ProcessGroups) -> PipelineComm:
        """The TP, PP and CP groups of this rank's
        :class:`~tulu3.parallel.groups.ProcessGroups`."""
        return cls(groups.tp, groups.pp, groups.pp_prev, groups.pp_next, groups.pp_last,
                   groups.pp_size, groups.tp_size, groups.cp, groups.cp_size, groups.cp_rank)


def generate(chunks: list[torch.nn.Module], prompts: Sequence[Sequence[int]],
             params: SamplingParams, vocab: int, eos_ids: Sequence[int], *,
             keys: Sequence[int] | None = None, use_cache: bool | None = None,
             batch_size: int | None = None, max_tokens: int | None = None,
             in_flight: int | None = None, stop: StopCheck | None = None,
             comm: PipelineComm | None = None) -> list[GenerationResult]:
    """Generate a response for every prompt (token ids, no padding), in the prompts' order.

    Args:
        chunks: this rank's model chunks (DDP-wrapped or not), as the trainer holds them.
        params: max_new_tokens, temperature (0 = greedy), top_p, seed.
        vocab: the real vocabulary size; padded output rows beyond it are never picked.
        eos_ids: token ids that end a response.
        keys: per prompt, the key its sampling generator is seeded with together with
            ``params.seed`` (default: the prompt's index). Give each sample a distinct, layout-
            independent key (e.g. its index in the global batch) for reproducible runs.
        use_cache: KV cache on (default when the model has SDPAttention) or full recompute.
        batch_size: at most this many rows per generation micro-batch (default: no limit).
        max_tokens: at most this many KV-cache slots, rows x (longest prompt +
            ``max_new_tokens``), per micro-batch (default: no limit; a prompt alone over it
            gets a micro-batch of its own). Without either limit all prompts are one batch.
        in_flight: micro-batches decoding at once (default: the pipeline stages, ``comm.pp``);
            the KV caches of that many micro-batches are held together.
        stop: called on every row's response so far after each token, on every rank; True
            ends the row there (stop strings: :class:`tulu3.rollout.stop.StopStrings`).
        comm: process groups (``PipelineComm.from_groups``); may be left out only when this
            is the only rank (no communication).
    """
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    if comm is None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            raise ValueError("generate: pass comm=PipelineComm.from_groups(groups) when there "
                             "is more than one rank")
        comm = PipelineComm()
    check_generation_spec(chunks)
    keys = list(range(len(prompts))) if keys is None else list(keys)
    # CP rank r: prompts r, r + cp, ... (every rank of its TP x PP group holds the same share)
    mine = list(range(comm.cp_rank, len(prompts), comm.cp))
    results = _generate_rows(chunks, [prompts[i] for i in mine], [keys[i] for i in mine],
                             params, vocab, eos_ids, use_cache, batch_size, max_tokens,
                             in_flight, stop, comm)
    if comm.cp == 1:
        return results
    shares: list[list[GenerationResult] | None] = [None] * comm.cp
    dist.all_gather_object(shares, results, group=comm.cp_group)
    out: list[GenerationResult | None] = [None] * len(prompts)
    for rank, share in enumerate(shares):
        for row, result in zip(range(rank, len(prompts), comm.cp), share, strict=True):
            out[row] = result
    return out  # type: ignore[return-value]


def _generate_rows(chunks: list[torch.nn.Module], prompts: list[list[int]], keys: list[int],
                   params: SamplingParams, vocab: int, eos_ids: Sequence[int],
                   use_cache: bool | None, batch_size: int | None, max_tokens: int | None,
                   in_flight: int | None, stop: StopCheck | None, comm: PipelineComm
                   ) -> list[GenerationResult]:
    """:func:`generate` of this rank's prompts (its CP share), without communication over CP."""
    if not prompts:
        return []
    if use_cache is None:
        use_cache = bool(attention_modules(chunks))
    device = next(unwrap(chunks[0]).parameters()).device
    parts = split_micro_batches([len(p) for p in prompts], params.max_new_tokens, max_tokens,
                                batch_size)
    states = [DecodeState([list(prompts[i]) for i in part], [keys[i] for i in part], params,
                          eos_ids, device, stop) for part in parts]
    with generation_mode(chunks):
        decoder = PipelinedDecoder(chunks, comm, params, vocab, use_cache)
        decoder.run(states, in_flight or comm.pp)
    results: list[GenerationResult | None] = [None] * len(prompts)
    for part, state in zip(parts, states, strict=True):
        for row, result in zip(part, state.results(), strict=True):
            results[row] = result
    return results  # type: ignore[return-value]


def check_generation_spec(chunks: list[torch.nn.Module]) -> None:
    """Refuse what generation cannot do right: Transformer Engine's causal attention ignores
    the left-padding mask (pads would be attended). Context parallelism is no obstacle:
    generation feeds whole rows without ``packed_seq_params``, which never use the CP group."""
    model = unwrap(chunks[0])
    if getattr(model, "packed_format", None) == "thd":
        raise ValueError("generation (RLVR rollouts, eval) needs model.spec=torch: Transformer "
                         "Engine attention ignores the left-padding mask")


@contextmanager
def generation_mode(chunks: list[torch.nn.Module]) -> Iterator[None]:
    """eval mode, no autograd, sequence parallelism and RoPE's CP slicing off; restored
    afterwards."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from tulu3.stages.forward import eval_mode

    models = [unwrap(c) for c in chunks]
    # Megatron caches the flag in its linears and (as reduce_scatter_embeddings) embeddings.
    switched = [(m, name, getattr(m, name)) for model in models for m in model.modules()
                for name in SEQUENCE_PARALLEL_FLAGS if isinstance(getattr(m, name, None), bool)]
    # Megatron's RotaryEmbedding cuts its table to this CP rank's chunks of the row, and fails
    # on lengths that do not divide by 2 cp (a decode step feeds one token). TuluGPTModel
    # replaces that table by the per-token one of the explicit position ids (whole rows here),
    # so generation only needs the cut switched off.
    rotary = [(m, m.cp_group) for model in models for m in model.modules()
              if isinstance(m, RotaryEmbedding) and getattr(m, "cp_group", None) is not None
              and m.cp_group.size() > 1]
    config = models[0].config
    config_sp = config.sequence_parallel
    try:
        for module, name, _ in switched:
            setattr(module, name, False)
        for module, _ in rotary:
            module.cp_group = None
        config.sequence_parallel = False
        with eval_mode(models):
            yield
    finally:
        config.sequence_parallel = config_sp
        for module, name, value in switched:
            setattr(module, name, value)
        for module, group in rotary:
            module.cp_group = group
        clear = getattr(RotaryEmbedding.forward, "cache_clear", None)
        if rotary and clear is not None:  # lru-cached by length: drop the tables built uncut
            clear()
