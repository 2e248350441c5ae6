"""Test helpers for the kernels: random problems, one forward + backward, comparison to the oracle.

Lives in the package (like ``tulu3.testing``) so the per-file tests and the forked
tensor-parallel workers share one definition of "equal to the reference".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.logprobs_reference import reference_linear_logprobs

# "equal to the reference": |got - want| <= atol + rtol * |want|
TOLERANCES = {torch.float32: {"rtol": 1e-5, "atol": 1e-5},
              torch.bfloat16: {"rtol": 1e-2, "atol": 1e-2}}


@dataclass
class Problem:
    """One random log-prob problem; the same ``seed`` gives the same tensors on every rank."""

    hidden: Tensor  # [n, h] dtype
    weight: Tensor  # [v, h] dtype, the WHOLE vocabulary
    labels: Tensor  # [n] int64, some -100
    grad_logprobs: Tensor  # [n] fp32 upstream gradient
    grad_entropy: Tensor  # [n] fp32 upstream gradient

    def to(self, device: str | torch.device) -> Problem:
        return Problem(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def make_problem(n: int, h: int, v: int, dtype: torch.dtype, seed: int = 0) -> Problem:
    """Logits of order 1 (so bf16 rounding stays inside the tolerance), every 4th label ignored,
    and the first label pinned to the last id (a label in the last, partial vocab block)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(dtype)
    weight = (torch.randn(v, h, generator=gen) / h**0.5).to(dtype)
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[1::4] = -100
    labels[0] = v - 1
    return Problem(hidden, weight, labels, torch.randn(n, generator=gen),
                   torch.randn(n, generator=gen))


LogprobFn = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor | None]]


def forward_backward(fn: LogprobFn, hidden: Tensor, weight: Tensor, p: Problem) -> dict:
    """Run ``fn(hidden, weight, labels)`` and the backward of ``g.logprobs + e.entropy``.

    ``hidden`` and ``weight`` are detached copies made leaves here. Returns fp32 ``logprobs``,
    ``entropy`` (None if fn gave none), ``grad_hidden``, ``grad_weight``.
    """
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    logprobs, entropy = fn(hidden, weight, p.labels)
    loss = (logprobs * p.grad_logprobs).sum()
    if entropy is not None:
        loss = loss + (entropy * p.grad_entropy).sum()
    loss.backward()
    return {"logprobs": logprobs.detach(),
            "entropy": None if entropy is None else entropy.detach(),
            "grad_hidden": hidden.grad.float(), "grad_weight": weight.grad.float()}


def reference_results(p: Problem, with_entropy: bool) -> dict:
    """The oracle's results for the whole vocabulary, single process."""
    fn = lambda h, w, y: reference_linear_logprobs(h, w, y, with_entropy)
    return forward_backward(fn, p.hidden, p.weight, p)


def assert_results_close(got: dict, want: dict, dtype: torch.dtype,
                         vocab_slice: slice = slice(None)) -> None:
    """Every result equal to the oracle's within the dtype's tolerance.

    ``vocab_slice`` selects the oracle's weight-gradient rows this rank's shard owns.
    """
    tol = TOLERANCES[dtype]
    assert (got["entropy"] is None) == (want["entropy"] is None)
    for key in ("logprobs", "entropy", "grad_hidden", "grad_weight"):
        expected = want[key][vocab_slice] if key == "grad_weight" else want[key]
        if expected is not None:
            torch.testing.assert_close(got[key], expected, **tol, msg=lambda m, k=key: f"{k}: {m}")


def shard_bounds(v: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of rank's vocabulary shard; the last shard is smaller when v % world != 0."""
    size = -(-v // world)
    return min(rank * size, v), min((rank + 1) * size, v)


def triton_device() -> str:
    """"cuda" where compiled Triton kernels run, else "cpu" with TRITON_INTERPRET=1 set.

    Call before the first ``kernels.*_triton`` import: ``@triton.jit`` reads the variable when a
    kernel is defined.
    """
    import os

    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "cuda"
    os.environ["TRITON_INTERPRET"] = "1"
    return "cpu"
