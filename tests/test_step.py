"""tulu3.step.attention_inputs: how each spec receives the documents of a micro-batch.

The torch and te specs get megatron's PackedSeqParams (cu_seqlens), never a dense [b, 1, s, s]
mask; only megatron's local spec (the numerical reference) still takes a mask.
"""

from __future__ import annotations

import pytest
import torch

from tulu3.data.packing import cu_seqlens
from tulu3.step import attention_inputs

PACKED = {"seq_ids": torch.tensor([[0, 0, 1, 1, 1, -1], [2, 2, 2, 3, -1, -1]])}
PLAIN = {"seq_ids": torch.tensor([[0, 0, 0, -1], [1, 1, 1, 1]])}


def test_torch_spec_gets_cu_seqlens_for_packed_rows_and_under_cp() -> None:
    params, mask = attention_inputs(PACKED, "sbhd", cp=1)
    assert mask is None and params.qkv_format == "sbhd"
    assert params.cu_seqlens_q.tolist() == cu_seqlens(PACKED["seq_ids"])[0].tolist()
    assert params.max_seqlen_q == 6  # the row length: megatron sizes its RoPE table by it
    assert attention_inputs(PLAIN, "sbhd", cp=1) == (None, None)  # SDPA is_causal
    params, mask = attention_inputs(PLAIN, "sbhd", cp=2)  # CP masks by global position
    assert mask is None and params.cu_seqlens_q.tolist() == [0, 3, 4, 8]


def test_te_gets_thd_one_row_per_micro_batch() -> None:
    one_row = {"seq_ids": PACKED["seq_ids"][:1]}
    params, mask = attention_inputs(one_row, "thd", cp=1)
    assert mask is None and params.qkv_format == "thd"
    assert params.cu_seqlens_q.tolist() == [0, 2, 5, 6] == params.cu_seqlens_q_padded.tolist()
    assert params.cu_seqlens_q.dtype == torch.int32 and params.max_seqlen_q == 3
    assert attention_inputs(PLAIN, "thd", cp=1) == (None, None)
    with pytest.raises(ValueError, match="micro_batch=1"):
        attention_inputs(PACKED, "thd", cp=1)
    with pytest.raises(ValueError, match="cp=1"):
        attention_inputs(one_row, "thd", cp=2)


def test_local_spec_keeps_its_reference_mask() -> None:
    params, mask = attention_inputs(PACKED, "mask", cp=1)
    assert params is None and mask.shape == (2, 1, 6, 6)
    with pytest.raises(ValueError, match="parallel.cp"):
        attention_inputs(PACKED, "mask", cp=2)
