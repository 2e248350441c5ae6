"""HF -> tulu3 checkpoint -> megatron at TP2xPP2 and PP2xVPP2 -> HF, on gloo ranks.

Two multi-process launches (they cost ~10-20 s each on 2 CPU cores) carry every check:
- TP2xPP2 (4 ranks, torch spec, untied): the converter's checkpoint loads in megatron with every
  parameter bitwise equal to its TP piece of the HF weights; the pipeline forward matches
  transformers' logits (fp32, 1e-5); the HF path of ``load_into_chunks`` gives the same
  parameters; megatron saves the model (the trainer's format) and exports it in-process.
  The tied model converted for PP2xVPP2 loads there too (params), and is exported.
- PP2xVPP2 (2 ranks, local spec): the tied model converted at PP2xVPP2 (params, logits), and the
  untied TP2xPP2 megatron save resharded by ``reshard`` to TP1xPP2xVPP2 (params, export).
The parent then converts megatron's own saves back to HF and compares every tensor bitwise.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from ckpt_testlib import (
    SHAPE,
    TIED,
    VOCAB,
    assert_bit_exact,
    hf_tensors,
    mismatched_params,
    pipeline_logits,
    reference_logits,
    save_tiny_hf,
)

from checkpoints_tools import hf_to_megatron, megatron_to_hf, reshard
from tulu3.checkpoint.dcp_io import DistReader
from tulu3.checkpoint.format import read_meta
from tulu3.parallel.groups import ProcessGroups

pytestmark = pytest.mark.distributed

TOKENS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))


def _build(shape, tp: int, pp: int, vpp: int, spec: str):
    from tulu3.config import ModelConfig
    from tulu3.model.build import build_model_chunks
    from tulu3.parallel.init import init_model_parallel
    from tulu3.parallel.layout import ParallelLayout

    layout = ParallelLayout(world_size=dist.get_world_size(), tp=tp, pp=pp, vpp=vpp)
    init_model_parallel(layout, seed=0)
    cfg = ModelConfig(preset="tiny", vocab=shape.vocab, tied_embeddings=shape.tied_embeddings,
                      spec=spec)
    return build_model_chunks(cfg, layout, ProcessGroups.current()), layout


def _logits_diff(chunks, ref: torch.Tensor) -> float | None:
    logits = pipeline_logits(chunks, TOKENS, VOCAB)
    return None if logits is None else float((logits - ref).abs().max())


def _tp2pp2(paths: dict, ref: torch.Tensor) -> dict:
    from megatron.core import parallel_state as ps

    from tulu3.checkpoint.export import export_hf_from_chunks
    from tulu3.checkpoint.format import make_meta, save_model, write_meta
    from tulu3.checkpoint.hf_config import read_hf_config
    from tulu3.checkpoint.load import load_into_chunks

    chunks, layout = _build(SHAPE, 2, 2, 1, "torch")
    groups = ProcessGroups.current()
    tp_rank = ps.get_tensor_model_parallel_rank()
    kind = load_into_chunks(paths["converted"], chunks, SHAPE, groups)
    hf = hf_tensors(paths["hf"])
    result = {"kind": kind, "bad": mismatched_params(chunks, hf, SHAPE, tp_rank, 2),
              "logits_diff": _logits_diff(chunks, ref)}
    fresh, _ = _build(SHAPE, 2, 2, 1, "torch")
    result["hf_kind"] = load_into_chunks(paths["hf"], fresh, SHAPE, groups)
    result["hf_path_bad"] = mismatched_params(fresh, hf, SHAPE, tp_rank, 2)
    save_model(chunks, paths["saved"])
    if dist.get_rank() == 0:
        write_meta(paths["saved"], make_meta(SHAPE, 2, 2, 1, "fp32", step=3,
                                             hf_config=read_hf_config(paths["hf"])))
        (paths["saved"] / "optimizer").mkdir()  # as the trainer's: reshard must say it drops it
    export_hf_from_chunks(chunks, SHAPE, layout, paths["exported"], groups=groups,
                          hf_config=read_hf_config(paths["hf"]), tokenizer=paths["hf"])
    # The tied model, converted for PP2xVPP2, loads here at TP2xPP2 as it is (no reshard).
    tied, _ = _build(TIED, 2, 2, 1, "torch")
    load_into_chunks(paths["converted_tied"], tied, TIED, groups)
    result["tied_bad"] = mismatched_params(tied, hf_tensors(paths["hf_tied"]), TIED, tp_rank, 2)
    export_hf_from_chunks(tied, TIED, layout, paths["exported_tied_tp2pp2"], groups=groups)
    return result


def _pp2vpp2(paths: dict, ref_tied: torch.Tensor) -> dict:
    from tulu3.checkpoint.export import export_hf_from_chunks
    from tulu3.checkpoint.format import make_meta, save_model, write_meta
    from tulu3.checkpoint.load import load_into_chunks

    chunks, layout = _build(TIED, 1, 2, 2, "local")
    groups = ProcessGroups.current()
    load_into_chunks(paths["converted_tied"], chunks, TIED, groups)
    hf_tied = hf_tensors(paths["hf_tied"])
    result = {"bad": mismatched_params(chunks, hf_tied, TIED, 0, 1),
              "logits_diff": _logits_diff(chunks, ref_tied),
              "has_output_copy": any(n == "output_layer.weight" for c in chunks
                                     for n, _ in c.named_parameters())}
    save_model(chunks, paths["saved_tied"])
    if dist.get_rank() == 0:
        write_meta(paths["saved_tied"], make_meta(TIED, 1, 2, 2, "fp32"))
    export_hf_from_chunks(chunks, TIED, layout, paths["exported_tied"], groups=groups)
    untied, layout = _build(SHAPE, 1, 2, 2, "local")
    load_into_chunks(paths["resharded"], untied, SHAPE, groups)
    result["resharded_bad"] = mismatched_params(untied, hf_tensors(paths["hf"]), SHAPE, 0, 1)
    export_hf_from_chunks(untied, SHAPE, layout, paths["exported_pp2vpp2"], groups=groups)
    return result


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("parallel")
    out = {name: root / name for name in ("hf", "hf_tied", "converted", "converted_tied",
                                          "saved", "saved_tied", "exported", "exported_tied",
                                          "resharded", "hf_from_saved", "hf_from_saved_tied",
                                          "exported_tied_tp2pp2", "exported_pp2vpp2")}
    save_tiny_hf(out["hf"], SHAPE, seed=0)
    save_tiny_hf(out["hf_tied"], TIED, seed=1)
    hf_to_megatron.convert(out["hf"], out["converted"], tp=2, pp=2, quiet=True)
    hf_to_megatron.convert(out["hf_tied"], out["converted_tied"], tp=1, pp=2, vpp=2, quiet=True)
    return out


@pytest.fixture(scope="module")
def refs(paths) -> dict:
    return {"untied": reference_logits(paths["hf"], TOKENS),
            "tied": reference_logits(paths["hf_tied"], TOKENS)}


@pytest.fixture(scope="module")
def tp2pp2(paths, refs) -> list[dict]:
    from tulu3.testing import run_distributed_test

    return run_distributed_test(_tp2pp2, 4, paths, refs["untied"])


@pytest.fixture(scope="module")
def pp2vpp2(paths, refs, tp2pp2) -> list[dict]:
    from tulu3.testing import run_distributed_test

    notes = reshard.reshard(paths["saved"], paths["resharded"], tp=1, pp=2, vpp=2, quiet=True)
    assert any("optimizer" in n and "NOT carried" in n for n in notes), notes
    return run_distributed_test(_pp2vpp2, 2, paths, refs["tied"])


def test_tp2pp2_loads_bit_exact_and_matches_transformers(tp2pp2):
    assert all(r["kind"] == "tulu3" and r["hf_kind"] == "hf" for r in tp2pp2)
    assert [r["bad"] for r in tp2pp2] == [[]] * 4
    assert [r["hf_path_bad"] for r in tp2pp2] == [[]] * 4
    assert [r["tied_bad"] for r in tp2pp2] == [[]] * 4
    diffs = [r["logits_diff"] for r in tp2pp2 if r["logits_diff"] is not None]
    assert len(diffs) == 2 and max(diffs) < 1e-5, diffs  # the two TP ranks of the last stage


def test_converter_writes_megatrons_keys_and_shapes(paths, tp2pp2):
    """Tensor keys, global shapes and dtypes equal a megatron save of the same model."""
    ours, theirs = DistReader(paths["converted"] / "model"), DistReader(paths["saved"] / "model")
    assert {k: (v.size, v.properties.dtype) for k, v in ours.tensors.items()} == \
        {k: (v.size, v.properties.dtype) for k, v in theirs.tensors.items()}
    # fc1 chunks: megatron's swiglu factory stores gate and up pieces apart; we cut the same way.
    fc1 = "decoder.layers.mlp.linear_fc1.weight"
    assert sorted(c.offsets for c in ours.tensors[fc1].chunks) == \
        sorted(c.offsets for c in theirs.tensors[fc1].chunks)


def test_round_trip_tp2pp2_bit_exact(paths, tp2pp2):
    megatron_to_hf.export(paths["saved"], paths["hf_from_saved"], quiet=True,
                          max_shard_bytes=100_000)
    assert_bit_exact(hf_tensors(paths["hf_from_saved"]), hf_tensors(paths["hf"]))
    assert len(list(paths["hf_from_saved"].glob("model-*-of-*.safetensors"))) > 1
    assert read_meta(paths["saved"]).step == 3


def test_in_process_export_loads_in_transformers(paths, refs, tp2pp2):
    from transformers import LlamaForCausalLM

    assert_bit_exact(hf_tensors(paths["exported"]), hf_tensors(paths["hf"]))
    model, info = LlamaForCausalLM.from_pretrained(paths["exported"], dtype=torch.float32,
                                                   output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    rope = model.config.rope_parameters
    assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0, rope
    assert (paths["exported"] / "tokenizer.json").is_file()
    with torch.no_grad():
        assert torch.equal(model.eval()(TOKENS).logits, refs["untied"])


def test_pp2vpp2_tied_and_reshard(paths, pp2vpp2):
    assert [r["bad"] for r in pp2vpp2] == [[]] * 2
    assert [r["resharded_bad"] for r in pp2vpp2] == [[]] * 2
    assert [r["has_output_copy"] for r in pp2vpp2] == [False, True]  # last stage holds a copy
    diffs = [r["logits_diff"] for r in pp2vpp2 if r["logits_diff"] is not None]
    assert len(diffs) == 1 and diffs[0] < 1e-5, diffs
    meta = read_meta(paths["resharded"])
    assert (meta.tp, meta.pp, meta.vpp) == (1, 2, 2)


def test_round_trip_pp2vpp2_tied_bit_exact(paths, pp2vpp2):
    from transformers import LlamaForCausalLM

    megatron_to_hf.export(paths["saved_tied"], paths["hf_from_saved_tied"], quiet=True)
    want = hf_tensors(paths["hf_tied"])
    assert "lm_head.weight" not in want
    assert_bit_exact(hf_tensors(paths["hf_from_saved_tied"]), want)
    assert_bit_exact(hf_tensors(paths["exported_tied"]), want)
    assert_bit_exact(hf_tensors(paths["exported_tied_tp2pp2"]), want)
    assert_bit_exact(hf_tensors(paths["exported_pp2vpp2"]), hf_tensors(paths["hf"]))
    _, info = LlamaForCausalLM.from_pretrained(paths["exported_tied"], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def test_tied_shape_is_read_from_config(paths):
    assert read_meta(paths["converted_tied"]).shape == TIED
