"""The rollout engine: KV-cached generation equals full recompute and HF ``generate`` (greedy) at
every layout; sampling is reproducible and layout-independent; padded vocabulary rows and
sequence parallelism are handled; at CP2 the CP ranks split the prompts. One 4-rank launch runs
every layout."""

from __future__ import annotations

import pytest
import torch

from tulu3.testing import run_distributed_test, tiny_hf_llama

pytestmark = pytest.mark.distributed

VOCAB = 500  # not a multiple of 128 x TP: the output layer has padded rows
NEW = 12
EOS = list(range(3, VOCAB, 25))  # 20 stop ids: some rows stop early, some run to NEW
MICRO_TOKENS = 40
LAYOUTS = {  # name -> (overrides); the rest of the 4 ranks is data parallel
    "TP2xPP2": ["parallel.tp=2", "parallel.pp=2"],
    "TP2xPP2 SP": ["parallel.tp=2", "parallel.pp=2", "parallel.sequence_parallel=true"],
    "PP2xVPP2xDP2": ["parallel.pp=2", "parallel.vpp=2", "train.global_batch=8"],
    "TP1xDP4": [],
    "TP1 local spec": ["model.spec=local"],
    # generation without CP on the same ranks: each CP rank generates every cp-th prompt
    "TP2xCP2": ["parallel.tp=2", "parallel.cp=2"],
}


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (5, 1, 9, 3, 7, 4)]


def _shape():
    from tulu3.config import load_config
    from tulu3.model.presets import resolve_shape

    return resolve_shape(load_config(None, [f"model.vocab={VOCAB}"]).model)


def _poison_padding(chunks: list, tp_rank: int) -> None:
    """Padded vocabulary rows = +-1000 x a real row: one of them is by far the largest logit at
    every position, so picking a padded row would show at once."""
    for chunk in chunks:
        if not chunk.post_process:
            continue
        weight = chunk.output_layer.weight
        rows = weight.shape[0]
        with torch.no_grad():
            for row in range(rows):
                if rows * tp_rank + row >= VOCAB:
                    weight[row] = weight[0] * (1000.0 if row % 2 else -1000.0)


def chars(tokens: list[int]) -> str:
    """A stand-in detokenizer for the stop-string runs: one character per token id."""
    return "".join(chr(0x100 + t) for t in tokens)


def _generate(overrides: list[str], state: dict, stop_string: str) -> dict:
    from megatron.core import parallel_state as ps

    from tulu3.config import load_config
    from tulu3.model import hf_mapping
    from tulu3.model.build import build_model_chunks
    from tulu3.parallel.groups import ProcessGroups
    from tulu3.parallel.init import init_model_parallel
    from tulu3.parallel.layout import make_layout
    from tulu3.rollout import PipelineComm, SamplingParams, generate
    from tulu3.rollout.stop import StopStrings

    cfg = load_config(None, [f"model.vocab={VOCAB}", "train.global_batch=4", *overrides])
    layout = make_layout(cfg, 4)
    init_model_parallel(layout, seed=1234)
    shape = _shape()
    groups = ProcessGroups.current()
    chunks = build_model_chunks(cfg.model, layout, groups)
    tp_rank = groups.tp_rank
    comm = PipelineComm.from_groups(groups)
    for chunk in chunks:
        hf_mapping.load_hf_into_chunk(chunk, state.__getitem__, shape, tp_rank, layout.tp)
    _poison_padding(chunks, tp_rank)
    items = prompts()
    greedy = SamplingParams(NEW)
    sampled = SamplingParams(NEW, temperature=1.0, top_p=0.9, seed=5)
    out = {
        "cache": generate(chunks, items, greedy, VOCAB, EOS, comm=comm),
        "recompute": generate(chunks, items, greedy, VOCAB, EOS, use_cache=False, comm=comm),
        "sampled": generate(chunks, items, sampled, VOCAB, EOS, comm=comm),
        "sampled_again": generate(chunks, items, sampled, VOCAB, EOS, batch_size=4,
                                  comm=comm),
        "sampled_reversed": generate(chunks, items[::-1], sampled, VOCAB, EOS,
                                     keys=list(range(len(items)))[::-1], comm=comm)[::-1],
        # 4 micro-batches of <= 40 KV slots ([1, 3], [4, 5], [7], [9] tokens + NEW), decoded
        # in_flight at a time (default: one per pipeline stage), refilling freed slots.
        "micro": generate(chunks, items, greedy, VOCAB, EOS, max_tokens=MICRO_TOKENS,
                          comm=comm),
        "micro_recompute": generate(chunks, items, greedy, VOCAB, EOS, use_cache=False,
                                    max_tokens=MICRO_TOKENS, in_flight=3, comm=comm),
        "sampled_micro": generate(chunks, items, sampled, VOCAB, EOS, max_tokens=MICRO_TOKENS,
                                  in_flight=3, comm=comm),
        "stopped": generate(chunks, items, greedy, VOCAB, EOS, max_tokens=MICRO_TOKENS,
                            stop=StopStrings(chars, [stop_string]), comm=comm),
        "sequence_parallel_restored": chunks[0].config.sequence_parallel
        == cfg.parallel.sequence_parallel,
        "training_restored": all(c.training for c in chunks),
    }
    ps.destroy_model_parallel()
    return out


def _all_layouts(state: dict, stop_string: str) -> list[dict]:
    return [_generate(overrides, state, stop_string) for overrides in LAYOUTS.values()]


@pytest.fixture(scope="module")
def hf_model() -> torch.nn.Module:
    return tiny_hf_llama(_shape(), seed=0)


@pytest.fixture(scope="module")
def stop_string(hf_greedy: list) -> str:
    """Two tokens from inside the first response that runs to NEW: it must stop there."""
    row = next(r for r in hf_greedy if len(r) == NEW)
    return chars(row[4:6])


@pytest.fixture(scope="module")
def runs(hf_model: torch.nn.Module, stop_string: str) -> dict[str, dict]:
    # Imported here, before the fork: the 4 ranks inherit megatron instead of importing it.
    import tulu3.model.build  # noqa: F401
    import tulu3.rollout  # noqa: F401

    per_rank = run_distributed_test(_all_layouts, 4, hf_model.state_dict(), stop_string)
    return dict(zip(LAYOUTS, per_rank[0], strict=True))  # rank 0 holds every layout's output


@pytest.fixture(scope="module")
def hf_greedy(hf_model: torch.nn.Module) -> list[list[int]]:
    """HF transformers ``generate`` one prompt at a time (no padding), greedy, same eos ids."""
    model = hf_model
    out = []
    for prompt in prompts():
        ids = model.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False,
                             eos_token_id=EOS, pad_token_id=0, attention_mask=None)
        out.append(ids[0, len(prompt):].tolist())
    return out


def tokens(results: list) -> list[list[int]]:
    return [r.tokens for r in results]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_kv_cache_equals_recompute(runs: dict, layout: str) -> None:
    run = runs[layout]
    assert tokens(run["cache"]) == tokens(run["recompute"])
    for a, b in zip(run["cache"], run["recompute"], strict=True):
        assert a.has_eos == b.has_eos
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-4


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_greedy_equals_hf_generate(runs: dict, hf_greedy: list, layout: str) -> None:
    assert tokens(runs[layout]["cache"]) == hf_greedy


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_micro_batches_pipelined(runs: dict, hf_greedy: list, layout: str) -> None:
    """Generation micro-batches in flight together give the one-batch tokens and log-probs."""
    run = runs[layout]
    assert tokens(run["micro"]) == hf_greedy
    assert tokens(run["micro_recompute"]) == hf_greedy
    for a, b in zip(run["micro"], run["cache"], strict=True):
        assert a.has_eos == b.has_eos and a.stopped == a.has_eos
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-4
    assert tokens(run["sampled_micro"]) == tokens(run["sampled"])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_stop_string(runs: dict, hf_greedy: list, stop_string: str, layout: str) -> None:
    """Rows end on the token completing the stop string (oracle: the first prefix of HF's greedy
    response whose decode holds it), or on eos first; the others are unchanged."""
    want = []
    for row in hf_greedy:
        ends = [n for n in range(1, len(row) + 1) if stop_string in chars(row[:n])]
        want.append(row[:ends[0]] if ends else row)
    results = runs[layout]["stopped"]
    assert tokens(results) == want
    assert sum(r.stopped and not r.has_eos for r in results) >= 1
    assert all(r.stopped == (r.has_eos or stop_string in chars(r.tokens)) for r in results)


def test_split_micro_batches() -> None:
    from tulu3.rollout.decode import split_micro_batches

    lengths = [5, 1, 9, 3, 7, 4]
    assert split_micro_batches(lengths, NEW, MICRO_TOKENS) == [[1, 3], [5, 0], [4], [2]]
    assert split_micro_batches(lengths, NEW) == [[1, 3, 5, 0, 4, 2]]
    assert split_micro_batches(lengths, NEW, max_rows=4) == [[1, 3, 5, 0], [4, 2]]
    assert split_micro_batches(lengths, NEW, 10) == [[1], [3], [5], [0], [4], [2]]  # each alone


def test_eos_and_length(runs: dict, hf_greedy: list) -> None:
    results = runs["TP1xDP4"]["cache"]
    stopped = [r for r in results if r.has_eos]
    assert stopped and len(stopped) < len(results), [r.tokens for r in results]
    for result in results:
        if result.has_eos:
            assert result.tokens[-1] in EOS and not set(result.tokens[:-1]) & set(EOS)
        else:
            assert len(result.tokens) == NEW
        assert all(0 <= t < VOCAB for t in result.tokens)  # padded rows were poisoned


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sampling_reproducible(runs: dict, layout: str) -> None:
    run = runs[layout]
    assert tokens(run["sampled"]) == tokens(run["sampled_again"])
    assert tokens(run["sampled"]) == tokens(run["sampled_reversed"])
    assert tokens(run["sampled"]) == tokens(runs["TP1xDP4"]["sampled"])  # layout-independent
    assert tokens(run["sampled"]) != tokens(run["cache"])  # it does sample
    assert run["sequence_parallel_restored"] and run["training_restored"]
