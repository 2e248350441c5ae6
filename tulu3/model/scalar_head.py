"""``ScalarHeadModel``: the shared megatron Llama with a scalar head instead of the LM head.

One model serves the reward model (``--stage rm``) and PPO's value model (``rlvr.value_model``):
on the last pipeline stage ``forward`` returns a score per position, ``[b, s]`` fp32, from
``value_head`` (a bias-free linear hidden -> 1). Other stages behave like :class:`TuluGPTModel`.

Tensor parallelism: the head is *replicated*. The hidden states entering it are the same on
every TP rank (gathered first under sequence parallelism, with a backward that splits rather
than sums), so every TP rank computes identical scores, an identical loss and identical head
gradients; no TP communication is added. The head's weight carries no ``tensor_model_parallel``
attribute, so megatron counts it once in the gradient norm, and no ``sequence_parallel``
attribute, so it is never all-reduced across TP.

There is no LM output layer: megatron's GPTModel builds one on the last stage; it is dropped
right after construction (a transient allocation), so neither DDP's grad buffers nor the
optimizer nor checkpoints ever see it.

Weights (:func:`load_scalar_weights`): the backbone from an HF directory or a tulu3 checkpoint.
The head comes from the source when it has one (a tulu3 checkpoint whose ``tulu3.json`` says
``head: "scalar"``, or an HF ``LlamaForSequenceClassification`` with ``score.weight``), else
it is initialised as open-instruct does for its reward and value models: normal with std
``1 / sqrt(hidden + 1)``, from a fixed seed, so every rank and every layout gets the same head.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from megatron.core import tensor_parallel

from tulu3.config import ModelConfig
from tulu3.model.build import build_model_chunks
from tulu3.model.gpt import TuluGPTModel
from tulu3.model.presets import LlamaShape
from tulu3.parallel.groups import ProcessGroups
from tulu3.parallel.layout import ParallelLayout

HEAD_SEED = 20231206
"""Seed of the head's initialisation (the same tensor on every rank, whatever the layout)."""
VALUE_HEAD = "value_head.weight"


class ScalarHeadModel(TuluGPTModel):
    """TuluGPTModel whose last stage maps hidden states [s, b, h] to scores [b, s] (fp32)."""

    head_kind = "scalar"
    """Written into ``tulu3.json`` (``head``) when the trainer saves this model."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - GPTModel's signature
        kwargs["share_embeddings_and_output_weights"] = False  # no output layer to tie
        super().__init__(*args, **kwargs)
        if not self.post_process:
            return
        del self.output_layer
        device = next(self.decoder.parameters()).device
        self.value_head = torch.nn.Linear(self.config.hidden_size, 1, bias=False,
                                          dtype=self.config.params_dtype, device=device)
        init_value_head(self)

    def _postprocess(self, hidden_states: torch.Tensor, *args, **kwargs):  # noqa: ANN002, ANN003
        if not self.post_process or self._return_hidden:
            return super()._postprocess(hidden_states, *args, **kwargs)
        if self.config.sequence_parallel:
            # Every TP rank computes the same loss on the full sequence: its gradient is
            # already complete on each rank, so the backward splits it (no reduce-scatter sum).
            hidden_states = tensor_parallel.gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False)
        weight = self.value_head.weight
        scores = torch.nn.functional.linear(hidden_states.float(), weight.float())  # [s, b, 1]
        return scores.squeeze(-1).transpose(0, 1).contiguous()

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> dict:
        # megatron's LanguageModule expects ``output_layer.weight`` on the last stage; hide the
        # stage from that check only (the decoder keeps its own post_process flag). The head
        # is saved as a replicated tensor by megatron's default for plain modules.
        post, self.post_process = self.post_process, False
        try:
            return super().sharded_state_dict(prefix, sharded_offsets, metadata)
        finally:
            self.post_process = post

    def output_weight(self) -> torch.Tensor:
        raise AttributeError("ScalarHeadModel has no LM output layer")


def initial_value_head(hidden: int) -> torch.Tensor:
    """The head's initial weight [1, hidden] (fp32): normal with std 1 / sqrt(hidden + 1)
    (open-instruct's ``layer_init`` of the score head, after Stiennon et al. 2020), drawn from
    :data:`HEAD_SEED` on the CPU, so it is identical on every rank and at every layout."""
    gen = torch.Generator().manual_seed(HEAD_SEED)
    return torch.randn(1, hidden, generator=gen, dtype=torch.float32) / math.sqrt(hidden + 1)


def init_value_head(model: ScalarHeadModel) -> None:
    """Set ``model.value_head`` to :func:`initial_value_head`."""
    with torch.no_grad():
        weight = model.value_head.weight
        weight.copy_(initial_value_head(model.config.hidden_size).to(weight))


def build_scalar_chunks(cfg: ModelConfig, layout: ParallelLayout, groups: ProcessGroups,
                        per_token_loss: bool = True) -> list[ScalarHeadModel]:
    """This rank's scalar-head model, one chunk per virtual pipeline stage (as
    :func:`tulu3.model.build.build_model_chunks`, whose construction it reuses)."""
    return build_model_chunks(cfg, layout, groups, per_token_loss, model_class=ScalarHeadModel)


def load_scalar_weights(path: str | Path, chunks: list[torch.nn.Module], shape: LlamaShape,
                        groups: ProcessGroups) -> str:
    """Load a backbone (and the head when the source has one) into scalar-head chunks.

    Sources: an HF directory (``LlamaForCausalLM``: ``lm_head`` ignored, head initialised;
    ``LlamaForSequenceClassification`` with one label: ``score.weight`` is the head) or a tulu3
    checkpoint (a policy/SFT one: its output layer ignored, head initialised; a reward-model one,
    ``head: "scalar"`` in tulu3.json: head loaded), or a run directory (its latest checkpoint).
    ``chunks`` are this rank's unwrapped ScalarHeadModel chunks; ``groups`` gives their TP
    rank and size (for HF sources). Collective for tulu3 checkpoints. Returns "tulu3" | "hf"
    (the detected format).
    """
    from tulu3.checkpoint.format import load_model, read_meta
    from tulu3.checkpoint.load import (
        check_shape,
        checkpoint_shape,
        detect_format,
        resolve_checkpoint_dir,
    )

    path = resolve_checkpoint_dir(path)  # a run directory: its latest checkpoint
    kind = detect_format(path)
    check_shape(checkpoint_shape(path), shape, path)
    heads = [c for c in chunks if c.post_process]
    if kind == "tulu3":
        has_head = read_meta(path).head == "scalar"
        load_model(chunks, path, ignore=() if has_head else (VALUE_HEAD,))
    else:
        has_head = _load_hf(path, chunks, shape, groups)
    if not has_head:
        for chunk in heads:
            init_value_head(chunk)
    return kind


def _load_hf(path: str | Path, chunks: list[torch.nn.Module], shape: LlamaShape,
             groups: ProcessGroups) -> bool:
    """Backbone (+ ``score.weight`` when present) from an HF directory; True if it had a head."""
    from tulu3.checkpoint.errors import ConversionError
    from tulu3.checkpoint.hf_io import HFReader
    from tulu3.model import hf_mapping

    reader = HFReader(path)
    has_head = "score.weight" in reader.names()
    try:
        for chunk in chunks:
            def get(name: str, chunk: torch.nn.Module = chunk) -> torch.Tensor:
                if name == "score.weight" and not has_head:
                    return chunk.value_head.weight.detach().clone()  # re-initialised after
                return reader.read(name)

            hf_mapping.load_hf_into_chunk(chunk, get, shape, groups.tp_rank, groups.tp_size)
    finally:
        reader.close()
    if has_head and tuple(reader.entry("score.weight").shape) != (1, shape.hidden):
        raise ConversionError(f"{path}: score.weight has shape "
                              f"{reader.entry('score.weight').shape}; a reward model has one "
                              f"label: (1, {shape.hidden})")
    return has_head


def sequence_scores(scores: torch.Tensor, seq_ids: torch.Tensor,
                    num_seqs: int | None = None) -> torch.Tensor:
    """The score at the last token of each sequence (each packed document): [num_seqs].

    ``scores`` [b, s] (from :class:`ScalarHeadModel`), ``seq_ids`` [b, s] as in
    :mod:`tulu3.data.packing` (0..num_seqs-1, -1 on padding). The last token is the sequence's
    final real token (its eos in Tülu-format data), where an HF ``LlamaForSequenceClassification``
    reads its score too. Differentiable; raises when a sequence id has no token.
    """
    flat_ids = seq_ids.reshape(-1)
    real = flat_ids >= 0
    if num_seqs is None:
        num_seqs = int(flat_ids.max()) + 1 if bool(real.any()) else 0
    position = torch.arange(flat_ids.numel(), device=flat_ids.device)
    last = torch.full((num_seqs,), -1, dtype=torch.long, device=flat_ids.device)
    last = last.scatter_reduce(0, flat_ids[real], position[real], reduce="amax")
    if bool((last < 0).any()):
        missing = torch.nonzero(last < 0).flatten().tolist()
        raise ValueError(f"sequence_scores: sequences {missing} have no token in seq_ids")
    return scores.reshape(-1)[last]
