"""Peak-memory windows for the benchmarks: start one, read its peak, in bytes.

- CUDA: the caching allocator's live tensors (``memory_allocated`` / ``max_memory_allocated``).
- CPU (Linux): the process's resident set; the window starts by resetting the kernel's peak-RSS
  counter (``VmHWM``) through ``/proc/self/clear_refs``. Every allocation counts, PyTorch's and
  the libraries'.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import torch


def proc_status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (VmRSS, VmHWM, ...)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def start_peak_window(device: torch.device | str | None = None) -> int:
    """Reset the peak counter; returns the bytes held now (the window's base)."""
    if _is_cuda(device):
        torch.cuda.synchronize(device)
        held = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return held
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    return proc_status_kib("VmRSS") * 1024


def peak_bytes(device: torch.device | str | None = None) -> int:
    """The most bytes held since :func:`start_peak_window` (not minus its base)."""
    if _is_cuda(device):
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return proc_status_kib("VmHWM") * 1024


def _is_cuda(device: torch.device | str | None) -> bool:
    if device is None:
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


def pin_malloc_mmap_threshold() -> None:
    """Make glibc serve every block >= 128 KiB with mmap and unmap it on free.

    By default glibc raises its mmap threshold after large frees and then keeps freed tiles in
    its heap, so the resident set would count memory the program already released.
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_mmap_threshold = -3
    if not libc.mallopt(m_mmap_threshold, 128 * 1024):
        raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed")
