"""An uneven pipeline split end to end: 6 layers + embedding + loss = 8 units over PP4 (layers
1, 2, 2, 1; megatron's account_for_*_in_pipeline_split, as 405B's 126 + 2 over PP16).

HF -> hf_to_megatron at PP4 with both flags -> one 4-rank launch that (a) trains SFT from the
converted checkpoint with the loss curve of a single process started from the HF weights, and
(b) loads it into the PP4 model with every parameter bitwise equal to the HF tensor and the
pipeline's logits equal to transformers' (fp32); megatron's save of that model exports back to
HF bit-exact, and the trainer's checkpoint records the split.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
from ckpt_testlib import assert_bit_exact, hf_tensors, mismatched_params, pipeline_logits
from trainer_harness import run_many, sft_overrides, tiny_data

from checkpoints_tools import hf_to_megatron, megatron_to_hf
from tulu3.checkpoint.format import read_meta
from tulu3.testing import run_distributed_test

pytestmark = pytest.mark.distributed

FLAGS = ["parallel.account_for_embedding_in_pipeline_split=true",
         "parallel.account_for_loss_in_pipeline_split=true"]
TOKENS = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(5))


def _load_and_compare(paths: dict, shape, ref: torch.Tensor) -> dict:
    from tulu3.checkpoint.format import make_meta, save_model, split_flags, write_meta
    from tulu3.checkpoint.load import load_into_chunks
    from tulu3.config import ModelConfig
    from tulu3.model.build import build_model_chunks
    from tulu3.parallel.groups import ProcessGroups
    from tulu3.parallel.init import init_model_parallel
    from tulu3.parallel.layout import ParallelLayout

    layout = ParallelLayout(world_size=4, pp=4, account_for_embedding_in_pipeline_split=True,
                            account_for_loss_in_pipeline_split=True)
    init_model_parallel(layout, seed=0)
    cfg = ModelConfig(preset="tiny", layers=shape.layers, vocab=shape.vocab, spec="torch")
    groups = ProcessGroups.current()
    chunks = build_model_chunks(cfg, layout, groups)
    load_into_chunks(paths["ckpt"], chunks, shape, groups)
    logits = pipeline_logits(chunks, TOKENS, shape.vocab)
    save_model(chunks, paths["saved"])
    if dist.get_rank() == 0:
        write_meta(paths["saved"], make_meta(shape, 1, 4, 1, "fp32", **split_flags(layout)))
    return {"bad": mismatched_params(chunks, hf_tensors(paths["hf"]), shape, 0, 1),
            "layers": sorted({int(n.split(".")[2]) for c in chunks for n, _ in c.named_parameters()
                              if n.startswith("decoder.layers.")}),
            "diff": None if logits is None else float((logits - ref).abs().max())}


def _uneven(paths: dict, shape, ref: torch.Tensor, train: list[str]) -> dict:
    (curve,) = run_many([train])
    return {"curve": curve, **_load_and_compare(paths, shape, ref)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    from ckpt_testlib import reference_logits

    from tulu3.data.tokenizer import load_tokenizer
    from tulu3.model.presets import PRESETS
    from tulu3.testing import tiny_hf_llama

    root = tmp_path_factory.mktemp("uneven")
    data = tiny_data(root)
    vocab = load_tokenizer(data["tokenizer"]).vocab_size
    shape = dataclasses.replace(PRESETS["tiny"], vocab=vocab, layers=6)
    paths = {name: root / name for name in ("hf", "ckpt", "saved", "exported")}
    tiny_hf_llama(shape, seed=2).save_pretrained(paths["hf"])
    hf_to_megatron.convert(paths["hf"], paths["ckpt"], 1, 4, quiet=True,
                           account_for_embedding_in_pipeline_split=True,
                           account_for_loss_in_pipeline_split=True)
    base = ["model.layers=6", "train.max_steps=3", "parallel.tp=1", "data.pack=false"]
    single = sft_overrides(data, root / "single", *base, "parallel.pp=1",
                           f"model.load={paths['hf']}")
    uneven = sft_overrides(data, root / "pp4", *base, "parallel.pp=4", *FLAGS,
                           f"model.load={paths['ckpt']}")
    ref = reference_logits(paths["hf"], TOKENS)
    (reference,) = run_distributed_test(run_many, 1, [single])[0]
    results = run_distributed_test(_uneven, 4, paths, shape, ref, uneven)
    return {"paths": paths, "root": root, "reference": reference, "results": results}


def test_trains_from_converted_checkpoint_as_single_process(runs):
    want = runs["reference"]
    assert isinstance(want, list) and len(want) == 3, want
    got = runs["results"][0]["curve"]
    assert isinstance(got, list), got
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), f"step {step + 1}: {a} vs {b}"
    meta = read_meta(runs["root"] / "pp4" / "checkpoints" / "step_3")
    assert meta.account_for_embedding_in_pipeline_split and meta.pp == 4


def test_loads_bit_exact_at_uneven_split_and_matches_transformers(runs):
    results = runs["results"]
    assert [r["bad"] for r in results] == [[]] * 4
    assert [r["layers"] for r in results] == [[0], [0, 1], [0, 1], [0]]  # local numbers
    diffs = [r["diff"] for r in results if r["diff"] is not None]
    assert len(diffs) == 1 and diffs[0] < 1e-5, diffs


def test_megatron_save_at_uneven_split_round_trips(runs):
    paths = runs["paths"]
    megatron_to_hf.export(paths["saved"], paths["exported"], quiet=True)
    assert_bit_exact(hf_tensors(paths["exported"]), hf_tensors(paths["hf"]))
    assert read_meta(paths["saved"]).account_for_loss_in_pipeline_split
