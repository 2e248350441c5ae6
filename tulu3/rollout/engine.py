"""In-process generation on the trainer's own megatron chunks (any TP / PP / VPP; no weight copy).

    results = generate(chunks, prompts, SamplingParams(max_new_tokens=256, temperature=1.0,
                       seed=7), vocab=tokenizer.vocab_size, eos_ids=[tokenizer.eos_id])

Every rank of a model-parallel group (TP x PP) calls it with the same prompts and gets the same
results; data-parallel replicas generate their own prompts independently.

How a batch is generated:
- Prompts are left-padded to the longest one; each row's RoPE positions start at 0 at its first
  real token (TuluGPTModel rotates by ``position_ids``), and padded keys are masked out (a pad
  query attends to itself only, so no row of the softmax is empty).
- Prefill runs the padded prompts once, then each decode step feeds one token per row; the KV
  cache (tulu3/rollout/kv_cache.py) keeps every layer's keys and values, so a step costs one
  token's work. ``use_cache=False`` recomputes the whole sequence every step (the reference the
  tests compare against, and the path for specs without SDPAttention).
- A forward is one pass through the pipeline: each rank runs its chunks in order and hands the
  hidden states [s, b, h] to the next stage with point-to-point send / recv (all ranks know s and
  b, so no shapes are exchanged). The last stage applies its output-layer shard to the last
  position only (never [b, s, vocab] logits), gathers those [b, v_local] logits across TP, drops
  the padded vocabulary rows, picks the tokens (tulu3/rollout/sampling.py) and broadcasts them
  down its pipeline group.
- Sequence parallelism is switched off for the length of the call (a decode step has one token
  per row, which TP cannot split), and the chunks run in eval mode under ``torch.no_grad``.
- A row stops at its first eos; the batch stops when every row has, or at ``max_new_tokens``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from tulu3.parallel.ddp import unwrap
from tulu3.parallel.groups import ProcessGroups
from tulu3.rollout.kv_cache import attention_modules, kv_cache
from tulu3.rollout.sampling import SamplingParams, pick_tokens, row_generators, uniforms

SEQUENCE_PARALLEL_FLAGS = ("sequence_parallel", "reduce_scatter_embeddings")


@dataclass
class GenerationResult:
    """One response: its token ids (the eos included when it stopped on one)."""

    tokens: list[int]
    has_eos: bool
    logprobs: list[float] = field(default_factory=list)
    """The model's log-prob of each generated token (full vocabulary, temperature 1)."""


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

    @classmethod
    def from_groups(cls, groups: ProcessGroups) -> PipelineComm:
        """The TP and PP groups of this rank's :class:`~tulu3.parallel.groups.ProcessGroups`."""
        return cls(groups.tp, groups.pp, groups.pp_prev, groups.pp_next, groups.pp_last,
                   groups.pp_size, groups.tp_size)


def generate(chunks: list[torch.nn.Module], prompts: Sequence[Sequence[int]],
             params: SamplingParams, vocab: int, eos_ids: Sequence[int], *,
             keys: Sequence[int] | None = None, use_cache: bool | None = None,
             batch_size: int | None = None, comm: PipelineComm | None = None
             ) -> list[GenerationResult]:
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
        batch_size: rows per generation batch (default: all prompts at once).
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
    keys = list(range(len(prompts))) if keys is None else list(keys)
    if use_cache is None:
        use_cache = bool(attention_modules(chunks))
    # Similar lengths together: less left padding.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    size = batch_size or len(prompts)
    results: list[GenerationResult | None] = [None] * len(prompts)
    with generation_mode(chunks):
        for start in range(0, len(order), size):
            rows = order[start:start + size]
            batch = _generate_batch(chunks, [list(prompts[i]) for i in rows], params, vocab,
                                    set(eos_ids), [keys[i] for i in rows], use_cache, comm)
            for row, result in zip(rows, batch, strict=True):
                results[row] = result
    return results  # type: ignore[return-value]


@contextmanager
def generation_mode(chunks: list[torch.nn.Module]) -> Iterator[None]:
    """eval mode, no autograd, sequence parallelism off; restored afterwards."""
    models = [unwrap(c) for c in chunks]
    training = [m.training for m in models]
    # Megatron caches the flag in its linears and (as reduce_scatter_embeddings) embeddings.
    switched = [(m, name, getattr(m, name)) for model in models for m in model.modules()
                for name in SEQUENCE_PARALLEL_FLAGS if isinstance(getattr(m, name, None), bool)]
    config = models[0].config
    config_sp = config.sequence_parallel
    try:
        for model in models:
            model.eval()
        for module, name, _ in switched:
            setattr(module, name, False)
        config.sequence_parallel = False
        with torch.no_grad():
            yield
    finally:
        config.sequence_parallel = config_sp
        for module, name, value in switched:
            setattr(module, name, value)
        for model, was_training in zip(models, training, strict=True):
            model.train(was_training)


def _generate_batch(chunks: list[torch.nn.Module], prompts: list[list[int]],
                    params: SamplingParams, vocab: int, eos_ids: set[int], keys: list[int],
                    use_cache: bool, comm: PipelineComm) -> list[GenerationResult]:
    device = next(unwrap(chunks[0]).parameters()).device
    rows, longest, new = len(prompts), max(len(p) for p in prompts), params.max_new_tokens
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    tokens = torch.zeros(rows, longest + new, dtype=torch.long, device=device)
    valid = torch.zeros(rows, longest + new, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, longest - len(prompt):longest] = torch.tensor(prompt, device=device)
        valid[row, longest - len(prompt):] = True
    # Position of every slot: 0 at the row's first real token (pads clamp to 0, never attended).
    positions = (torch.arange(longest + new, device=device) - (longest - lengths)[:, None]
                 ).clamp(min=0)
    gens = None if params.greedy else row_generators(params.seed, keys)
    eos = torch.tensor(sorted(eos_ids), device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    out_tokens, out_logprobs = [], []
    cache = kv_cache(chunks, rows, longest + new) if use_cache else nullcontext()
    with cache:
        for step in range(new):
            end = longest + step
            start = 0 if step == 0 or not use_cache else end - 1
            mask = _mask(valid[:, :end], start)
            logits = _pipeline_forward(chunks, tokens[:, start:end], positions[:, start:end],
                                       mask, comm)
            picked, logprob = _pick(logits, params, vocab, gens, rows, device, comm)
            tokens[:, end] = picked
            out_tokens.append(picked)
            out_logprobs.append(logprob)
            done |= torch.isin(picked, eos)
            if bool(done.all()):
                break
    return _results(torch.stack(out_tokens, 1), torch.stack(out_logprobs, 1), eos)


def _mask(valid: torch.Tensor, start: int) -> torch.Tensor:
    """Megatron's convention (True = masked out) [b, 1, s_new, s_total] for queries at slots
    ``start..s_total-1``: causal, padded keys hidden, every query sees at least itself."""
    total = valid.shape[1]
    query = torch.arange(start, total, device=valid.device)[:, None]
    key = torch.arange(total, device=valid.device)[None, :]
    allowed = (key <= query) & (valid[:, None, :] | (key == query))
    return ~allowed[:, None]


def _pipeline_forward(chunks: list[torch.nn.Module], tokens: torch.Tensor,
                      positions: torch.Tensor, mask: torch.Tensor, comm: PipelineComm
                      ) -> torch.Tensor | None:
    """One forward through this rank's chunks in pipeline order; the last stage returns its
    logits of the last position [b, v_local], other ranks None."""
    seq, rows = tokens.shape[1], tokens.shape[0]
    hidden = None
    for chunk in chunks:
        model = unwrap(chunk)
        if not model.pre_process:
            hidden = torch.empty(seq, rows, model.config.hidden_size,
                                 dtype=model.config.pipeline_dtype, device=tokens.device)
            dist.recv(hidden, src=comm.prev_rank)
        model.set_input_tensor(hidden)
        output = model(tokens, positions, mask, return_hidden=model.post_process)
        if model.post_process:
            # Only the last position's logits: [b, h] x [v_local, h]^T (not [b, s, v_local]).
            return torch.nn.functional.linear(output[-1], model.output_weight())
        dist.send(output.contiguous(), dst=comm.next_rank)
    return None


def _pick(logits: torch.Tensor | None, params: SamplingParams, vocab: int,
          gens: list[torch.Generator] | None, rows: int, device: torch.device,
          comm: PipelineComm) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [b] and their log-probs [b], the same on every rank of the model-parallel group."""
    u = uniforms(gens, device) if gens is not None else None  # every rank draws: gens stay equal
    packed = torch.zeros(2, rows, dtype=torch.float64, device=device)
    if logits is not None:
        full = _gather_vocab(logits, comm)[:, :vocab].float()
        picked = pick_tokens(full, params, u)
        logprob = torch.log_softmax(full, dim=-1).gather(-1, picked[:, None]).squeeze(-1)
        packed = torch.stack([picked.double(), logprob.double()])
    if comm.pp > 1:
        dist.broadcast(packed, src=comm.last_rank, group=comm.pp_group)
    return packed[0].long(), packed[1].float()


def _gather_vocab(logits: torch.Tensor, comm: PipelineComm) -> torch.Tensor:
    """[b, v_local] vocab-parallel logits -> [b, v_local * tp] (TP rank order = vocab order)."""
    if comm.tp == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(comm.tp)]
    dist.all_gather(parts, logits.contiguous(), group=comm.tp_group)
    return torch.cat(parts, dim=-1)


def _results(tokens: torch.Tensor, logprobs: torch.Tensor, eos: torch.Tensor
             ) -> list[GenerationResult]:
    tokens, logprobs = tokens.cpu(), logprobs.cpu()
    is_eos = torch.isin(tokens, eos.cpu())
    out = []
    for row in range(tokens.shape[0]):
        hits = torch.nonzero(is_eos[row]).flatten()
        end = int(hits[0]) + 1 if len(hits) else tokens.shape[1]
        out.append(GenerationResult(tokens[row, :end].tolist(), bool(len(hits)),
                                    logprobs[row, :end].tolist()))
    return out
