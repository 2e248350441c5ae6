"""Fused kernels and their plain PyTorch references.

Public: :func:`linear_logprobs` (fused output layer + log-softmax + gather + entropy, vocab
parallel), :func:`vocab_parallel_logprobs` (the same from already computed sharded logits) and
:func:`cross_entropy`. Importing this package does not import Triton.
"""

from kernels.logprobs import cross_entropy, linear_logprobs
from kernels.logprobs_reference import reference_linear_logprobs, reference_logprobs
from kernels.vocab_parallel import IGNORE_INDEX, vocab_parallel_logprobs

__all__ = [
    "IGNORE_INDEX",
    "cross_entropy",
    "linear_logprobs",
    "reference_linear_logprobs",
    "reference_logprobs",
    "vocab_parallel_logprobs",
]
