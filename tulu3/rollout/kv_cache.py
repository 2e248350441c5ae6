"""A static KV cache inside the ``torch`` spec's attention, switched on for one generation.

``with kv_cache(chunks, batch, max_len):`` gives every :class:`~tulu3.model.attention.SDPAttention`
of this rank's chunks a :class:`LayerKVCache`; each forward inside the block appends its new keys
and values (already rotated by RoPE, this rank's query groups only) and attends over all cached
ones. The caller (tulu3/rollout/engine.py) passes the matching mask [b, 1, s_new, s_cached]. On
exit the caches are dropped and the model is the training model again: same weights, no copy.

Several micro-batches decoding at once (tulu3/rollout/pipeline.py) each own a list of caches
(:func:`new_caches`, one per attention module) and install theirs (:func:`install`) before each
forward of theirs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from tulu3.model.attention import SDPAttention
from tulu3.parallel.ddp import unwrap


class LayerKVCache:
    """Keys and values of one layer: [b, groups_local, max_len, d] each, filled left to right."""

    def __init__(self, batch: int, groups: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (batch, groups, max_len, head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0

    def append(self, key: torch.Tensor, value: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``key``/``value`` [b, g, s_new, d]; return every cached one [b, g, length, d]."""
        end = self.length + key.shape[2]
        if end > self.keys.shape[2]:
            raise RuntimeError(f"KV cache overflow: {end} tokens > max_len {self.keys.shape[2]}")
        self.keys[:, :, self.length:end] = key
        self.values[:, :, self.length:end] = value
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


def attention_modules(chunks: list[torch.nn.Module]) -> list[SDPAttention]:
    """Every SDPAttention of this rank's chunks (empty for the ``te`` and ``local`` specs)."""
    return [m for chunk in chunks for m in unwrap(chunk).modules() if isinstance(m, SDPAttention)]


def new_caches(chunks: list[torch.nn.Module], batch: int, max_len: int) -> list[LayerKVCache]:
    """One empty cache of ``max_len`` positions for ``batch`` rows per attention module of
    ``chunks`` (in :func:`attention_modules` order)."""
    modules = attention_modules(chunks)
    if not modules:
        raise ValueError("the KV cache needs model.spec=torch (SDPAttention); use "
                         "generate(..., use_cache=False) with other specs")
    config = unwrap(chunks[0]).config
    weight = next(unwrap(chunks[0]).parameters())
    return [LayerKVCache(batch, module.groups, max_len, config.kv_channels, config.params_dtype,
                         weight.device) for module in modules]


def install(modules: list[SDPAttention], caches: list[LayerKVCache] | None) -> None:
    """Give every attention module (:func:`attention_modules`) its cache from ``caches`` (None:
    detach them all)."""
    for index, module in enumerate(modules):
        module.kv_cache = None if caches is None else caches[index]


@contextmanager
def kv_cache(chunks: list[torch.nn.Module], batch: int, max_len: int) -> Iterator[None]:
    """Attach a fresh cache of ``max_len`` positions for ``batch`` rows to every attention."""
    modules = attention_modules(chunks)
    install(modules, new_caches(chunks, batch, max_len))
    try:
        yield
    finally:
        install(modules, None)
