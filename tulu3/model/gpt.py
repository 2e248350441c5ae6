"""``TuluGPTModel``: megatron's GPTModel with per-token RoPE positions and a hidden-state exit.

Two additions, both needed by post-training:
- RoPE follows ``position_ids`` (megatron's GPTModel rotates by the position in the row), so a
  packed row whose documents restart at position 0 gets the same numbers as unpacked documents,
  and a context-parallel rank (which holds two chunks of the row) rotates by global positions.
  THD batches (Transformer Engine, ``packed_seq_params.qkv_format == "thd"``) keep megatron's
  RoPE, which restarts at every cu_seqlens boundary: the same positions.
- ``forward(..., return_hidden=True)`` returns the final-norm hidden states [s, b, h] of the last
  stage instead of logits, so the fused log-prob kernel can apply the output layer chunk by chunk
  without materializing [tokens, vocab] logits.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel


class TuluGPTModel(GPTModel):
    _return_hidden = False
    _position_ids: torch.Tensor | None = None
    _thd = False
    packed_format = "sbhd"
    """How packed rows reach attention (tulu3.model.specs.PACKED_FORMATS; set by the build)."""

    def forward(self, input_ids: torch.Tensor | None, position_ids: torch.Tensor | None,
                attention_mask: torch.Tensor | None, *args, return_hidden: bool = False,
                **kwargs) -> torch.Tensor:
        """Shapes: input_ids/position_ids [b, s]; returns logits [b, s, v_local] (labels None),
        hidden [s, b, h] (return_hidden, last stage) or hidden [s, b, h] (other stages)."""
        self._return_hidden = return_hidden
        self._position_ids = position_ids
        packed = kwargs.get("packed_seq_params")
        self._thd = packed is not None and packed.qkv_format == "thd"
        try:
            return super().forward(input_ids, position_ids, attention_mask, *args, **kwargs)
        finally:
            self._position_ids = None
            self._return_hidden = False
            self._thd = False

    def _preprocess(self, *args, **kwargs):  # noqa: ANN002, ANN003 - megatron's signature
        out = super()._preprocess(*args, **kwargs)
        rotary = out[1]
        positions = self._position_ids
        if (rotary is None or positions is None or self.position_embedding_type != "rope"
                or self._thd):
            return out
        # The table before megatron's CP slicing: [n, 1, 1, d] for positions 0..n-1 -> per
        # token [s, b, 1, d].
        table = self.rotary_pos_emb.get_emb(int(positions.max()) + 1)[:, 0, 0, :]
        per_token = table[positions.transpose(0, 1)].unsqueeze(2)
        return (out[0], per_token, *out[2:])

    def _postprocess(self, hidden_states: torch.Tensor, *args, **kwargs):  # noqa: ANN002, ANN003
        if self._return_hidden and self.post_process:
            if self.config.sequence_parallel:
                # The fused kernel returns the full gradient on every TP rank: split, not sum.
                hidden_states = tensor_parallel.gather_from_sequence_parallel_region(
                    hidden_states, tensor_parallel_output_grad=False)
            return hidden_states
        return super()._postprocess(hidden_states, *args, **kwargs)

    def output_weight(self) -> torch.Tensor:
        """This TP rank's [v_local, h] output weight (the embedding when tied)."""
        if self.share_embeddings_and_output_weights:
            return self.shared_embedding_or_output_weight()
        return self.output_layer.weight
