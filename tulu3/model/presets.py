"""Llama 3.1 shapes (and a tiny one for tests), resolved from ``model.*`` recipe keys."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tulu3.config import ConfigError, ModelConfig


@dataclass(frozen=True)
class LlamaShape:
    """The architecture of one Llama model; every field is a ``model.*`` recipe key."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn_hidden: int
    vocab: int
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: bool = True
    tied_embeddings: bool = False
    max_seq_len: int = 131072

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


PRESETS: dict[str, LlamaShape] = {
    # hidden 64, GQA 4:2, rope scaling on: small enough for 4 CPU ranks, real enough to catch bugs.
    "tiny": LlamaShape(layers=4, hidden=64, heads=4, kv_heads=2, ffn_hidden=128, vocab=512),
    "llama3.1-8b": LlamaShape(layers=32, hidden=4096, heads=32, kv_heads=8, ffn_hidden=14336,
                              vocab=128256),
    "llama3.1-70b": LlamaShape(layers=80, hidden=8192, heads=64, kv_heads=8, ffn_hidden=28672,
                               vocab=128256),
    "llama3.1-405b": LlamaShape(layers=126, hidden=16384, heads=128, kv_heads=8,
                                ffn_hidden=53248, vocab=128256),
}


def resolve_shape(cfg: ModelConfig) -> LlamaShape:
    """The preset named by ``cfg.preset`` with every non-None ``model.*`` field applied."""
    if cfg.preset not in PRESETS:
        raise ConfigError(f"model.preset: unknown {cfg.preset!r}; choose one of {list(PRESETS)}")
    overrides = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(LlamaShape)
                 if getattr(cfg, f.name, None) is not None}
    shape = dataclasses.replace(PRESETS[cfg.preset], **overrides)
    if shape.hidden % shape.heads:
        raise ConfigError(f"model.hidden={shape.hidden} is not divisible by "
                          f"model.heads={shape.heads}")
    if shape.heads % shape.kv_heads:
        raise ConfigError(f"model.heads={shape.heads} is not divisible by "
                          f"model.kv_heads={shape.kv_heads}")
    return shape


def padded_vocab(vocab: int, tp: int, multiple: int = 128) -> int:
    """Vocabulary rows of the embedding/output layer: a multiple of ``multiple * tp``.

    Llama 3's 128256 becomes 129024 at TP 8; the padding rows are dropped on HF export.
    """
    step = multiple * tp
    return -(-vocab // step) * step


def param_count(shape: LlamaShape) -> int:
    """Parameters of the model (unpadded vocabulary), embeddings and output layer included."""
    kv_dim = shape.kv_heads * shape.head_dim
    attn = shape.hidden * (shape.hidden + 2 * kv_dim) + shape.hidden * shape.hidden
    mlp = 3 * shape.hidden * shape.ffn_hidden
    norms = 2 * shape.hidden
    embed = shape.vocab * shape.hidden * (1 if shape.tied_embeddings else 2)
    return shape.layers * (attn + mlp + norms) + embed + shape.hidden


def flops_per_token(shape: LlamaShape, seq_len: int, training: bool = True) -> float:
    """Model FLOPs per token: 6 x matmul params (+ causal attention 12 x L x h x s) for training.

    Matmul params count every layer's linears and the output layer (not the embedding lookup);
    the attention term 12 * layers * hidden * seq_len counts QK^T and AV forward + backward without
    the causal halving, the convention of the numbers in issue 10 and PaLM's MFU.
    """
    kv_dim = shape.kv_heads * shape.head_dim
    layer = (shape.hidden * (shape.hidden + 2 * kv_dim) + shape.hidden * shape.hidden
             + 3 * shape.hidden * shape.ffn_hidden)
    matmul_params = shape.layers * layer + shape.vocab * shape.hidden
    factor = 6 if training else 2
    attention = (12 if training else 4) * shape.layers * shape.hidden * seq_len
    return factor * matmul_params + attention


def with_shape(cfg: ModelConfig, shape: LlamaShape) -> ModelConfig:
    """``cfg`` with every shape field filled in, so the saved config.yaml is fully resolved."""
    return dataclasses.replace(cfg, **dataclasses.asdict(shape))
