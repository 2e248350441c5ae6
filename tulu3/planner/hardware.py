"""Accelerators the planner knows: memory, peak bf16 FLOP/s and link bandwidths (vendor figures)."""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3
MIB = 1024**2


@dataclass(frozen=True)
class GPUSpec:
    """One accelerator model and the links around it (SXM parts in 8-GPU HGX nodes)."""

    name: str
    hbm_bytes: float
    """Memory the driver reports (nvidia-smi ``memory.total``), bytes."""
    bf16_flops: float
    """Dense bf16 tensor-core peak, FLOP/s (no sparsity)."""
    hbm_bandwidth: float
    """HBM bandwidth, bytes/s."""
    nvlink_bandwidth: float
    """NVLink bandwidth per GPU and direction, bytes/s (the bus bandwidth a ring can reach)."""
    ib_bandwidth: float
    """Inter-node bandwidth per GPU and direction, bytes/s (one NIC per GPU)."""
    compute_efficiency: float = 0.668
    """Fraction of the bf16 peak that training math reaches in BF16 (calibrated on a published
    run by tulu3/planner/anchors.py; docs/PLANNER.md)."""
    fp8_efficiency: float = 1.063
    """The same in FP8 (model.fp8), still as a fraction of the *bf16* peak."""
    comm_efficiency: float = 0.8
    """Fraction of link bandwidth NCCL collectives reach for large messages (nccl-tests busbw)."""
    memory_efficiency: float = 0.8
    """Fraction of HBM bandwidth a memory-bound kernel (decode, Adam) reaches."""

    @property
    def achievable_flops(self) -> float:
        return self.bf16_flops * self.compute_efficiency


GPUS: dict[str, GPUSpec] = {
    # H100 SXM5: 81559 MiB reported, 989 TFLOP/s bf16, 3.35 TB/s, NVLink4 900 GB/s bidirectional,
    # NDR InfiniBand 400 Gb/s per GPU.
    "h100-80gb": GPUSpec("h100-80gb", hbm_bytes=81559 * MIB, bf16_flops=989e12,
                         hbm_bandwidth=3.35e12, nvlink_bandwidth=450e9, ib_bandwidth=50e9),
    # H200 SXM: same compute as H100, 141 GB HBM3e (143771 MiB reported) at 4.8 TB/s.
    "h200-141gb": GPUSpec("h200-141gb", hbm_bytes=143771 * MIB, bf16_flops=989e12,
                          hbm_bandwidth=4.8e12, nvlink_bandwidth=450e9, ib_bandwidth=50e9),
    # A100 SXM4 80GB: 312 TFLOP/s bf16, 2.04 TB/s, NVLink3 600 GB/s bidirectional,
    # HDR InfiniBand 200 Gb/s per GPU.
    "a100-80gb": GPUSpec("a100-80gb", hbm_bytes=81920 * MIB, bf16_flops=312e12,
                         hbm_bandwidth=2.039e12, nvlink_bandwidth=300e9, ib_bandwidth=25e9),
    # B200 (HGX): 2.25 PFLOP/s dense bf16, 180 GB HBM3e (183359 MiB reported) at 8 TB/s,
    # NVLink5 1.8 TB/s bidirectional, 400 Gb/s InfiniBand per GPU.
    "b200-180gb": GPUSpec("b200-180gb", hbm_bytes=183359 * MIB, bf16_flops=2250e12,
                          hbm_bandwidth=8e12, nvlink_bandwidth=900e9, ib_bandwidth=50e9),
}


def peak_bf16_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of the GPU a CUDA device name describes (``"NVIDIA H100 80GB
    HBM3"`` -> 989e12), matched on the model family (the ``GPUS`` key before its first ``-``);
    None for a GPU not in the table."""
    name = device_name.upper()
    for key, spec in GPUS.items():
        if key.split("-")[0].upper() in name:
            return spec.bf16_flops
    return None
