"""The fused layer kernels (RMSNorm, SwiGLU, RoPE) against their plain PyTorch references.

Without CUDA they run in Triton's interpreter (TRITON_INTERPRET set here, before the kernels are
defined). Bounds: every kernel output, forward and backward, is within
``(r * eps(dtype) + 8 k 2^-24) * magnitude`` of the reference evaluated in fp64 on the same
inputs, where ``magnitude`` is the same expression with every term made positive (so
cancellation does not shrink the bound below the rounding it must absorb), r the number of
roundings to the output dtype (each at most one ulp <= eps * |v|: Triton's interpreter truncates
fp32 -> bf16, GPUs round to nearest, half that; RMSNorm rounds twice, cast then scale) and k the
reduction length of the fp32 arithmetic. In fp32 the kernel must also match the fp32 reference
within the fp32 part of that bound.
"""

import torch

from kernels.testing import triton_device

DEVICE = triton_device()

import pytest  # noqa: E402

from kernels.layer_reference import (  # noqa: E402
    reference_rmsnorm,
    reference_rope,
    reference_swiglu,
)
from kernels.rmsnorm_triton import triton_rmsnorm  # noqa: E402
from kernels.rope_triton import triton_rope  # noqa: E402
from kernels.swiglu_triton import triton_swiglu  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]
EPS = 1e-5


def _run(fn, inputs: list[torch.Tensor], grad: torch.Tensor, *args) -> list[torch.Tensor]:
    """fn's output and the gradients of its float inputs, in fp64."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves, *args)
    out.backward(grad.to(out.dtype))
    return [out.detach().double()] + [t.grad.double() for t in leaves]


def _check(got, ref64, ref_same_dtype, magnitudes, dtype, k: int, roundings: int = 1) -> None:
    fp32_part = 8 * k * 2.0 ** -24
    for name, g, r, r_dt, m in zip(("out", "grad0", "grad1"), got, ref64, ref_same_dtype,
                                   magnitudes, strict=False):
        bound = (roundings * torch.finfo(dtype).eps + fp32_part) * m + 1e-30
        assert ((g - r).abs() <= bound).all(), (name, float(((g - r).abs() / bound).max()))
        if dtype == torch.float32:
            assert ((g - r_dt).abs() <= 2 * fp32_part * m + 1e-30).all(), name


def _randn(*shape, dtype, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm(dtype) -> None:
    h = 96  # not a power of two: masked lanes
    # 301 rows: the backward's 256-program cap gives 2 rows a program, the last one with 1.
    x = _randn(7, 43, h, dtype=dtype, seed=0, scale=3.0)
    w = (1 + _randn(h, dtype=torch.float32, seed=1, scale=0.1)).to(dtype)
    dy = _randn(7, 43, h, dtype=dtype, seed=2)
    got = _run(triton_rmsnorm, [x, w], dy, EPS)
    ref = _run(reference_rmsnorm, [x, w], dy, EPS)
    ref64 = _run(reference_rmsnorm, [x.double(), w.double()], dy.double(), EPS)
    x64, w64, dy64 = x.double(), w.double(), dy.double()
    rstd = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS)
    n, dn = (x64 * rstd).abs(), (dy64 * w64).abs()
    mags = [n * w64.abs(), rstd * (dn + n * (dn * n).mean(-1, keepdim=True)),
            (dy64.abs() * n).sum((0, 1))]
    _check(got, ref64, ref, mags, dtype, k=301, roundings=2)  # dw sums 301 rows (> h)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu(dtype) -> None:
    f = 1100  # more than one 1024-wide block, the second one partial
    x = _randn(3, 2, 2 * f, dtype=dtype, seed=3, scale=2.0)
    dy = _randn(3, 2, f, dtype=dtype, seed=4)
    got = _run(triton_swiglu, [x], dy)
    ref = _run(reference_swiglu, [x], dy)
    ref64 = _run(reference_swiglu, [x.double()], dy.double())
    gate, up = x.double().chunk(2, -1)
    s, dy64 = torch.sigmoid(gate), dy.double().abs()
    silu = (gate * s).abs()
    d_gate = dy64 * up.abs() * s * (1 + gate.abs() * (1 - s))
    mags = [silu * up.abs(), torch.cat([d_gate, dy64 * silu], -1)]
    _check(got, ref64, ref, mags, dtype, k=4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_row", [False, True], ids=["freqs[s,1]", "freqs[s,b]"])
def test_rope(dtype, per_row) -> None:
    s, b, heads, d = 6, 2, 3, 16
    t = _randn(s, b, heads, d, dtype=dtype, seed=5)
    angles = torch.rand(s, b if per_row else 1, 1, d // 2,
                        generator=torch.Generator().manual_seed(6)) * 8
    freqs = torch.cat([angles, angles], -1).to(DEVICE)  # Llama's layout: both halves equal
    dy = _randn(s, b, heads, d, dtype=dtype, seed=7)
    got = _run(triton_rope, [t], dy, freqs)
    ref = _run(lambda x: reference_rope(x, freqs), [t], dy)
    ref64 = _run(lambda x: reference_rope(x, freqs.double()), [t.double()], dy.double())
    c, sn = freqs.double().cos().abs(), freqs.double().sin().abs()

    def rotated_mag(v):
        v1, v2 = v.double().abs().chunk(2, -1)
        return v.double().abs() * c + torch.cat([v2, v1], -1) * sn

    _check(got, ref64, ref, [rotated_mag(t), rotated_mag(dy)], dtype, k=4)


def test_rope_refuses_interleaved_and_partial() -> None:
    t = torch.zeros(2, 1, 1, 8)
    with pytest.raises(ValueError, match="non-interleaved"):
        triton_rope(t, torch.zeros(2, 1, 1, 8), interleaved=True)
    with pytest.raises(ValueError, match="partial rotary"):
        triton_rope(t, torch.zeros(2, 1, 1, 4))
