"""Checkpoint tools: the command lines over :mod:`tulu3.checkpoint` (the library that reads,
writes, converts and reshards checkpoints; this package is never imported by ``tulu3``).

- ``hf_to_megatron``: HF safetensors -> tulu3 (megatron torch_dist) checkpoint at any TP/PP/VPP
  (:mod:`tulu3.checkpoint.from_hf`).
- ``megatron_to_hf``: tulu3 checkpoint -> HF safetensors (:mod:`tulu3.checkpoint.to_hf`).
- ``reshard``: a tulu3 checkpoint to another layout (:mod:`tulu3.checkpoint.reshard`).

Each ``main`` calls :func:`tulu3.checkpoint.errors.run_cli` for the shared error / exit-code
handling.
"""

from tulu3.checkpoint.errors import ConversionError, run_cli

__all__ = ["ConversionError", "run_cli"]
