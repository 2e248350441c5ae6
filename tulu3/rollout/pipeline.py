"""Decoding several generation micro-batches at once so that every pipeline stage is busy.

With one micro-batch, a decode step passes through the PP stages one after another and every
stage but one waits. Megatron's inference pipelining (``megatron/inference/text_generation/
forward_step.py``, ``_with_pipelining_forward_step``) splits the batch into micro-batches that
follow each other through the stages within one step; here each micro-batch also moves on to its
next step on its own, so with ``in_flight >= pp`` micro-batches stage s works on micro-batch
m + 1 while stage s + 1 works on m, round-robin over the slots, fill and drain only once per call.

Schedule (the same on every rank, so no shapes or decisions are exchanged): ``in_flight`` slots
are visited in order, round after round; a slot's micro-batch runs its next step (prefill, then
one token per step); a finished micro-batch frees its slot for the next waiting one. A forward
runs this rank's chunks in order, receiving the hidden states [s, b, h] from the previous stage
and sending them on, all point-to-point. The last stage picks the tokens and sends them with
their log-probs ("packet" [2, b] fp64) to every other stage of its pipeline group, which apply
them (eos, stop strings) before that micro-batch's next step. Sends are asynchronous (``isend``)
and receives are posted in the exact order the sender sent: from the last stage a rank receives
packets in schedule order, and before a hidden state from the last stage (interleaved pipelining
wraps around to rank 0) the packets of every earlier forward; so the order holds without tags,
as NCCL (which ignores them) needs. Every receive waits only on work earlier in the schedule:
no deadlock.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from tulu3.parallel.ddp import unwrap
from tulu3.rollout.decode import DecodeState
from tulu3.rollout.kv_cache import attention_modules, install
from tulu3.rollout.sampling import SamplingParams, pick_tokens, uniforms

if TYPE_CHECKING:
    from tulu3.rollout.engine import PipelineComm


class PipelinedDecoder:
    """Runs :class:`DecodeState` micro-batches through this rank's chunks (see module doc)."""

    def __init__(self, chunks: list[torch.nn.Module], comm: PipelineComm, params: SamplingParams,
                 vocab: int, use_cache: bool) -> None:
        self.chunks, self.comm, self.params, self.vocab = chunks, comm, params, vocab
        self.models = [unwrap(c) for c in chunks]
        self.modules = attention_modules(chunks) if use_cache else []
        self.use_cache = use_cache
        self.is_last = self.models[-1].post_process
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.stages = (dist.get_process_group_ranks(comm.pp_group) if comm.pp > 1
                       else [self.rank])
        self.pending: deque[DecodeState] = deque()
        """Micro-batches whose packet (from the last stage) this rank has not received yet."""
        self.sends: list[tuple[dist.Work, torch.Tensor]] = []

    def run(self, states: list[DecodeState], in_flight: int) -> None:
        """Decode every micro-batch to the end, at most ``in_flight`` at a time."""
        waiting, slots = deque(states), [None] * max(1, in_flight)
        try:
            while True:
                busy = False
                for index, state in enumerate(slots):
                    if state is not None:
                        self._receive(until=state)
                        if state.finished:
                            state.caches = None
                            slots[index] = state = None
                    if state is None and waiting:
                        slots[index] = state = waiting.popleft()
                        if self.use_cache:
                            state.attach_cache(self.chunks)
                    if state is not None:
                        busy = True
                        self._forward(state)
                self.sends = [(w, t) for w, t in self.sends if not w.is_completed()]
                if not busy:
                    break
        finally:
            install(self.modules, None)
        for work, _ in self.sends:
            work.wait()
        self.sends = []

    def _forward(self, state: DecodeState) -> None:
        """One step of ``state`` through this rank's chunks (the last stage picks tokens)."""
        tokens, positions, mask = state.inputs(self.use_cache)
        if not self.is_last:
            self.pending.append(state)
        if self.use_cache:
            install(self.modules, state.caches)
        seq, rows, comm = tokens.shape[1], tokens.shape[0], self.comm
        hidden = None
        for model in self.models:
            if not model.pre_process:
                hidden = torch.empty(seq, rows, model.config.hidden_size,
                                     dtype=model.config.pipeline_dtype, device=tokens.device)
                if comm.prev_rank == comm.last_rank and not self.is_last:
                    self._receive(keep=1)  # packets the last stage sent before this tensor
                dist.recv(hidden, src=comm.prev_rank)
            model.set_input_tensor(hidden)
            output = model(tokens, positions, mask, return_hidden=model.post_process)
            if model.post_process:
                # Only the last position's logits: [b, h] x [v_local, h]^T (not [b, s, v]).
                logits = torch.nn.functional.linear(output[-1], model.output_weight())
                packet = self._pick(logits, state)
                for stage in self.stages:
                    if stage != self.rank:
                        self._send(packet, stage)
                state.apply(packet[0].long(), packet[1].float())
                return
            self._send(output.contiguous(), comm.next_rank)

    def _pick(self, logits: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """[2, b] fp64: the picked tokens and their log-probs (full vocabulary, T = 1)."""
        gens = state.generators()
        u = uniforms(gens, logits.device) if gens is not None else None
        full = gather_vocab(logits, self.comm)[:, :self.vocab].float()
        picked = pick_tokens(full, self.params, u)
        logprob = torch.log_softmax(full, dim=-1).gather(-1, picked[:, None]).squeeze(-1)
        return torch.stack([picked.double(), logprob.double()])

    def _send(self, tensor: torch.Tensor, dst: int) -> None:
        self.sends.append((dist.isend(tensor, dst=dst), tensor))

    def _receive(self, until: DecodeState | None = None, keep: int = 0) -> None:
        """Receive pending packets in order: up to ``until``'s (none if it has no pending one),
        or all but the last ``keep``."""
        if until is not None:
            ids = [id(s) for s in self.pending]
            count = ids.index(id(until)) + 1 if id(until) in ids else 0
        else:
            count = len(self.pending) - keep
        for _ in range(count):
            state = self.pending.popleft()
            packet = torch.empty(2, state.rows, dtype=torch.float64, device=state.tokens.device)
            dist.recv(packet, src=self.comm.last_rank)
            state.apply(packet[0].long(), packet[1].float())


def gather_vocab(logits: torch.Tensor, comm: PipelineComm) -> torch.Tensor:
    """[b, v_local] vocab-parallel logits -> [b, v_local * tp] (TP rank order = vocab order)."""
    if comm.tp == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(comm.tp)]
    dist.all_gather(parts, logits.contiguous(), group=comm.tp_group)
    return torch.cat(parts, dim=-1)
