"""Megatron-core patches, side by side with one :func:`install`: the CPU/gloo compat layer
(:mod:`.cpu`, only without CUDA) and the DistributedOptimizer fixes of the torch-Adam path
(:mod:`.optimizer`)."""

from __future__ import annotations


def install() -> None:
    """Install every patch this machine needs, once: the CPU compat layer when CUDA is absent,
    the DistributedOptimizer fixes when neither Apex nor TE provides the fused Adam."""
    from tulu3.patches import cpu, optimizer

    cpu.install()
    optimizer.install()
