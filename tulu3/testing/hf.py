"""Tiny Hugging Face Llama models built in the tests: the oracle for logits and conversion."""

from __future__ import annotations

from typing import Any

import torch


def hf_llama_config(shape: Any, **overrides: Any) -> Any:
    """A transformers LlamaConfig with the shape of a tulu3 LlamaShape (Llama 3.1 rope scaling)."""
    from transformers import LlamaConfig

    rope = ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
            if shape.rope_scaling else None)
    kwargs = dict(vocab_size=shape.vocab, hidden_size=shape.hidden,
                  intermediate_size=shape.ffn_hidden, num_hidden_layers=shape.layers,
                  num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                  rms_norm_eps=shape.norm_eps, rope_theta=shape.rope_theta, rope_scaling=rope,
                  tie_word_embeddings=shape.tied_embeddings,
                  max_position_embeddings=shape.max_seq_len, attention_bias=False,
                  mlp_bias=False, bos_token_id=0, eos_token_id=1)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_hf_llama(shape: Any, seed: int = 0) -> Any:
    """A randomly initialised transformers LlamaForCausalLM (fp32, eval mode) of ``shape``.

    Norm weights are randomised too, so a swapped norm cannot hide behind all-ones weights.
    """
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(hf_llama_config(shape)).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model
