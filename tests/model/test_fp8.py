"""FP8 linears of the torch spec (tulu3/model/fp8.py) against the quantize -> dequantize oracle
(tulu3/model/fp8_reference.py) and the exact fp64 product.

Bounds come from the formats: e4m3 rounds to 2^-4 relative, e5m2 to 2^-3, plus half a subnormal
step, fp32 accumulation over k and the rounding of the output dtype
(:func:`matmul_error_bound`). The check against the oracle is tight (only accumulation and output
rounding), so a wrong format, scale or transpose fails it; the check against the exact product
shows the FP8 error is that of FP8 and no more. TP2 (with and without sequence parallelism) is
compared with TP1 within the sum of both bounds; a tiny SFT run with FP8 follows bf16's loss
curve within model.fp8's stated tolerance.
"""

from __future__ import annotations

import pytest
import torch
from parity_harness import run_layout

from tulu3.model.fp8 import FP8Linear, FP8Options, fp8_matmul
from tulu3.model.fp8_reference import (
    E4M3,
    E5M2,
    fake_quantize,
    matmul_error_bound,
    reference_linear,
    reference_matmul,
)
from tulu3.testing import run_distributed_test

HIDDEN, FFN, SEQ, BATCH = 64, 96, 8, 3  # 24 tokens: not a multiple of 16 (padding path)
# Stated tolerance of an FP8 loss curve against bf16's, relative: 2^-7. Each product rounds by at
# most 2^-4 (e4m3); the loss averages ~100 tokens' log-softmax of logits that each sum h = 64
# products with independent rounding, which shrinks the typical relative error by sqrt(128) to
# ~2^-7.5. Measured: 6.2e-4, rowwise 9.3e-4, BF16 edges 2.7e-4. Broken FP8 gradients move the curve
# more: 4 bf16 steps lower it 9%.
LOSS_RTOL = E4M3.unit_roundoff / 8


def _tight(a: torch.Tensor, b: torch.Tensor, fa, fb, rowwise: bool, dtype) -> torch.Tensor:
    """|fp8_matmul - reference| bound: fp32 accumulation over k and output rounding only."""
    qa = fake_quantize(a, fa, -1 if rowwise else None).abs()
    qb = fake_quantize(b, fb, 0 if rowwise else None).abs()
    return (1.01 * a.shape[1] * 2.0 ** -24 + torch.finfo(dtype).eps) * (qa @ qb) + 1e-30


def test_quantize_hand_worked() -> None:
    x = torch.tensor([1.0, 0.3, -0.5, 0.0])
    # e4m3: scale 448 (amax 1); 0.3 * 448 = 134.4 lies between 128 and 144 -> 128.
    assert fake_quantize(x, E4M3, None).tolist() == [1.0, 128 / 448, -0.5, 0.0]
    # e5m2: scale 57344; 0.3 * 57344 = 17203.2 lies between 16384 and 20480 -> 16384.
    assert fake_quantize(x, E5M2, None).tolist() == [1.0, 16384 / 57344, -0.5, 0.0]
    rows = torch.tensor([[2.0, 0.6], [0.0, 0.0]])  # per row: scale 224, and 1 for the zero row
    assert fake_quantize(rows, E4M3, -1).tolist() == [[2.0, 128 / 224], [0.0, 0.0]]


@pytest.mark.parametrize("rowwise", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt_a", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_matmul_equals_reference_and_fp8_bound(rowwise, dtype, fmt_a) -> None:
    gen = torch.Generator().manual_seed(0)
    a = (torch.randn(37, 40, generator=gen) * 3).to(dtype)  # 37 x 40: both dims padded
    b = (torch.randn(40, 24, generator=gen) * 0.02).to(dtype)
    out = fp8_matmul(a, b, fmt_a, E4M3, rowwise, dtype).double()
    assert out.shape == (37, 24)
    ref = reference_matmul(a, b, fmt_a, E4M3, rowwise)
    assert ((out - ref).abs() <= _tight(a, b, fmt_a, E4M3, rowwise, dtype)).all()
    exact = a.double() @ b.double()
    err = (out - exact).abs()
    assert (err <= matmul_error_bound(a, b, fmt_a, E4M3, rowwise, dtype)).all()
    # FP8 really happened: worse than bf16 rounding of the exact result somewhere.
    assert (err > torch.finfo(torch.bfloat16).eps * exact.abs()).any()


@pytest.mark.parametrize("rowwise", [False, True])
def test_linear_forward_and_gradients(rowwise) -> None:
    """FP8Linear's output and both gradients equal the oracle, and are within the FP8 bound of
    bf16's (bf16 linear error + FP8 error, both against the exact product)."""
    gen = torch.Generator().manual_seed(1)
    bf = torch.bfloat16
    x = torch.randn(SEQ, BATCH, HIDDEN, generator=gen).to(bf).requires_grad_()
    w = (torch.randn(FFN, HIDDEN, generator=gen) * 0.05).to(bf).requires_grad_()
    g = torch.randn(SEQ, BATCH, FFN, generator=gen).to(bf)
    opts = FP8Options(rowwise=rowwise)
    FP8Linear.apply(x, w, opts).backward(g)
    fp8 = [x.grad, w.grad]
    x2, g2 = x.detach().reshape(-1, HIDDEN), g.reshape(-1, FFN)
    y = FP8Linear.apply(x.detach(), w.detach(), opts).reshape(-1, FFN)
    ref = reference_linear(x2, w.detach(), g2, rowwise)
    operands = [(x2, w.detach().t(), E4M3), (g2, w.detach(), E5M2), (g2.t(), x2, E5M2)]
    got = [y, fp8[0].reshape(-1, HIDDEN), fp8[1]]
    for out, r, (a, b, fa) in zip(got, ref, operands, strict=True):
        out = out.double()
        assert ((out - r).abs() <= _tight(a, b, fa, E4M3, rowwise, bf)).all()
        exact = a.double() @ b.double()
        bf16_out = (a @ b).double()  # the bf16 linear: fp32 accumulate, bf16 result
        bf16_bound = (1.01 * a.shape[1] * 2.0 ** -24 + torch.finfo(bf).eps / 2) * (
            a.double().abs() @ b.double().abs())
        fp8_bound = matmul_error_bound(a, b, fa, E4M3, rowwise, bf)
        assert ((out - exact).abs() <= fp8_bound).all()
        assert ((out - bf16_out).abs() <= fp8_bound + bf16_bound).all()


def _operands() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    shapes = {"x": (SEQ, BATCH, HIDDEN), "w1": (FFN, HIDDEN), "g1": (SEQ, BATCH, FFN),
              "z": (SEQ, BATCH, FFN), "w2": (HIDDEN, FFN), "g2": (SEQ, BATCH, HIDDEN)}
    scale = {"w1": 0.05, "w2": 0.05}
    return {k: (torch.randn(s, generator=gen) * scale.get(k, 1.0)).to(torch.bfloat16)
            for k, s in shapes.items()}


def _tp_linears(sequence_parallel: bool) -> dict:
    """FP8 Column- then RowParallelLinear at TP2 on known operands; this rank's pieces."""
    from megatron.core import parallel_state as ps

    from tulu3.config import load_config
    from tulu3.model.build import transformer_config
    from tulu3.model.fp8 import FP8ColumnParallelLinear, FP8RowParallelLinear
    from tulu3.parallel.init import init_model_parallel
    from tulu3.parallel.layout import make_layout

    cfg = load_config(None, ["parallel.tp=2", "model.dtype=bf16",
                             f"parallel.sequence_parallel={str(sequence_parallel).lower()}"])
    layout = make_layout(cfg, 2)
    init_model_parallel(layout, seed=1)
    config = transformer_config(cfg.model, layout)
    rank, ops = ps.get_tensor_model_parallel_rank(), _operands()
    common = dict(config=config, init_method=config.init_method, bias=False, skip_bias_add=True,
                  fp8=FP8Options())
    col = FP8ColumnParallelLinear(HIDDEN, FFN, gather_output=False, **common)
    row = FP8RowParallelLinear(FFN, HIDDEN, input_is_parallel=True, **common)
    with torch.no_grad():
        col.weight.copy_(ops["w1"].chunk(2, 0)[rank])
        row.weight.copy_(ops["w2"].chunk(2, 1)[rank])
    seq = (lambda t: t.chunk(2, 0)[rank]) if sequence_parallel else (lambda t: t)
    x = seq(ops["x"]).clone().requires_grad_()
    y1, _ = col(x)
    (y1 * ops["g1"].chunk(2, -1)[rank]).sum().backward()
    z = ops["z"].chunk(2, -1)[rank].clone().requires_grad_()
    y2, _ = row(z)
    (y2 * seq(ops["g2"])).sum().backward()
    ps.destroy_model_parallel()
    return {"y1": y1.detach(), "gx": x.grad, "gw1": col.weight.grad, "y2": y2.detach(),
            "gz": z.grad, "gw2": row.weight.grad}


def _merge_tp(ranks: list[dict], sequence_parallel: bool) -> dict[str, torch.Tensor]:
    """Full tensors, flattened to 2-D matmul results, from the two ranks' pieces."""
    seq_dim = 0 if sequence_parallel else None
    cat = {"y1": -1, "gx": seq_dim, "gw1": 0, "y2": seq_dim, "gz": -1, "gw2": 1}
    out = {}
    for key, dim in cat.items():
        pieces = [r[key] for r in ranks]
        full = pieces[0] if dim is None else torch.cat(pieces, dim)
        out[key] = full.reshape(-1, full.shape[-1]).double() if full.dim() == 3 else full.double()
    return out


def _bounds(ops: dict[str, torch.Tensor], shards: int) -> dict[str, torch.Tensor]:
    """Bound on |FP8 result - exact| of each merged result when split over ``shards`` TP ranks.

    Sharded reductions (the input gradient of the column linear, the output of the row one) are
    sums of per-rank FP8 products, each within its bound, plus the bf16 rounding of the sum.
    """
    bf = torch.bfloat16
    x, z = ops["x"].reshape(-1, HIDDEN), ops["z"].reshape(-1, FFN)
    g1, g2 = ops["g1"].reshape(-1, FFN), ops["g2"].reshape(-1, HIDDEN)
    w1, w2 = ops["w1"], ops["w2"]
    zs, g1s, w1s, w2s = (t.chunk(shards, d) for t, d in ((z, 1), (g1, 1), (w1, 0), (w2, 1)))

    def bound(a, b, fa):
        return matmul_error_bound(a, b, fa, E4M3, False, bf)

    def summed(pairs, fa):
        total = sum(bound(a, b, fa) for a, b in pairs)
        return total + torch.finfo(bf).eps * sum(a.double().abs() @ b.double().abs()
                                                 for a, b in pairs)

    return {
        "y1": torch.cat([bound(x, w.t(), E4M3) for w in w1s], 1),
        "gx": summed(list(zip(g1s, w1s, strict=True)), E5M2),
        "gw1": torch.cat([bound(g.t(), x, E5M2) for g in g1s], 0),
        "y2": summed([(zj, w.t()) for zj, w in zip(zs, w2s, strict=True)], E4M3),
        "gz": torch.cat([bound(g2, w, E5M2) for w in w2s], 1),
        "gw2": torch.cat([bound(g2.t(), zj, E5M2) for zj in zs], 1),
    }


def _exact(ops: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    d = {k: v.double() for k, v in ops.items()}
    x, z = d["x"].reshape(-1, HIDDEN), d["z"].reshape(-1, FFN)
    g1, g2 = d["g1"].reshape(-1, FFN), d["g2"].reshape(-1, HIDDEN)
    return {"y1": x @ d["w1"].t(), "gx": g1 @ d["w1"], "gw1": g1.t() @ x,
            "y2": z @ d["w2"].t(), "gz": g2 @ d["w2"], "gw2": g2.t() @ z}


def _tp1(ops: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same two layers in one process: plain FP8Linear on the full weights."""
    out = {}
    for name, inp, w, g in (("1", "x", "w1", "g1"), ("2", "z", "w2", "g2")):
        a = ops[inp].clone().requires_grad_()
        weight = ops[w].clone().requires_grad_()
        y = FP8Linear.apply(a, weight, FP8Options())
        y.backward(ops[g])
        gin = "gx" if name == "1" else "gz"
        out.update({f"y{name}": y.detach(), gin: a.grad, f"gw{name}": weight.grad})
    return {k: v.reshape(-1, v.shape[-1]).double() for k, v in out.items()}


def _two_rank_checks(root: str) -> dict:
    """One 2-rank launch: the TP2 layers (with and without sequence parallelism) and tiny SFT
    at TP2 with FP8 and with bf16."""
    steps, base = 4, ["model.dtype=bf16", "parallel.tp=2"]
    return {"layers": {sp: _tp_linears(sp) for sp in (False, True)},
            "fp8": run_layout(2, [*base, "model.fp8=current"], steps=steps)["loss"],
            "fp8_sp": run_layout(2, [*base, "model.fp8=current",
                                     "parallel.sequence_parallel=true"], steps=steps)["loss"]}


def _one_rank_runs() -> dict:
    steps, base = 4, ["model.dtype=bf16"]
    runs = {"bf16": [], "fp8": ["model.fp8=current"],
            "fp8_rowwise": ["model.fp8=current", "model.fp8_granularity=rowwise",
                            "model.fp8_format=e4m3"],
            "fp8_edges": ["model.fp8=current", "model.fp8_bf16_edges=true"]}
    return {name: run_layout(1, [*base, *extra], steps=steps)["loss"]
            for name, extra in runs.items()}


@pytest.fixture(scope="module")
def one_rank() -> dict:
    return run_distributed_test(_one_rank_runs, 1)[0]


@pytest.mark.distributed
def test_tiny_sft_fp8_follows_bf16(one_rank: dict) -> None:
    """Same weights and batches: every FP8 variant's loss stays within LOSS_RTOL of bf16's at
    each step, and training still lowers the loss."""
    bf16 = torch.tensor(one_rank["bf16"])
    for name in ("fp8", "fp8_rowwise", "fp8_edges"):
        got = torch.tensor(one_rank[name])
        assert ((got - bf16).abs() <= LOSS_RTOL * bf16).all(), (name, got, bf16)
        assert got[-1] < got[0], (name, got)
        assert not torch.equal(got, bf16), name  # FP8 really ran


@pytest.mark.distributed
def test_tp2_equals_tp1_within_fp8_error(one_rank: dict, tmp_path) -> None:
    ranks = run_distributed_test(_two_rank_checks, 2, str(tmp_path))
    ops = _operands()
    exact, tp1 = _exact(ops), _tp1(ops)
    bound1, bound2 = _bounds(ops, 1), _bounds(ops, 2)
    for sp in (False, True):
        tp2 = _merge_tp([r["layers"][sp] for r in ranks], sp)
        for key in exact:
            assert ((tp1[key] - exact[key]).abs() <= bound1[key]).all(), (sp, key)
            assert ((tp2[key] - exact[key]).abs() <= bound2[key]).all(), (sp, key)
            assert ((tp2[key] - tp1[key]).abs() <= bound1[key] + bound2[key]).all(), (sp, key)
    fp8_tp1 = torch.tensor(one_rank["fp8"])
    for name in ("fp8", "fp8_sp"):
        got = torch.tensor(ranks[0][name])
        assert ((got - fp8_tp1).abs() <= LOSS_RTOL * fp8_tp1).all(), (name, got, fp8_tp1)


def test_bf16_edge_layers_per_pipeline_stage() -> None:
    """4 layers over PP2 with fp8_bf16_edges: global layers 0 and 3 stay BF16, wherever they
    are built (megatron's is_first_last_bf16_layer numbering)."""
    from tulu3.config import load_config
    from tulu3.model.build import transformer_config
    from tulu3.model.specs import layer_spec
    from tulu3.parallel.layout import make_layout

    cfg = load_config(None, ["model.fp8=current", "model.fp8_bf16_edges=true", "parallel.pp=2"])
    config = transformer_config(cfg.model, make_layout(cfg, 2))
    kinds = []
    for pp_rank in (0, 1):
        block = layer_spec("torch", config, None, cfg.model, pp_rank=pp_rank)
        kinds += [getattr(layer.submodules.mlp.submodules.linear_fc1, "module", None)
                  for layer in block.layer_specs]
    fp8 = [k is not None and k.__name__ == "FP8ColumnParallelLinear" for k in kinds]
    assert fp8 == [False, True, True, False]
