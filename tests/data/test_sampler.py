"""GlobalBatchSampler: determinism, DP sharding, epochs, exact resume, errors."""

from __future__ import annotations

import itertools

import pytest

from tulu3.data.sampler import GlobalBatchSampler


def _steps(sampler, n=None):
    return list(itertools.islice(iter(sampler), n))


def _flat(micro_batches):
    return [i for mb in micro_batches for i in mb]


def test_shapes_and_determinism():
    s = GlobalBatchSampler(100, global_batch=16, micro_batch=2, dp_rank=1, dp_size=2, seed=3)
    steps = _steps(s)
    assert len(steps) == len(s) == 6  # 100 // 16, the partial last batch dropped
    assert all(len(step) == 4 and all(len(mb) == 2 for mb in step) for step in steps)
    again = GlobalBatchSampler(100, 16, 2, dp_rank=1, dp_size=2, seed=3)
    assert _steps(again) == steps
    other = GlobalBatchSampler(100, 16, 2, dp_rank=1, dp_size=2, seed=4)
    assert _steps(other) != steps


def test_dp_ranks_partition_each_global_batch_and_epochs_reshuffle():
    ranks = [GlobalBatchSampler(64, 16, 2, dp_rank=r, dp_size=4, seed=0, epochs=2)
             for r in range(4)]
    per_rank = [_steps(s) for s in ranks]
    seen_by_epoch = [[], []]
    for step in range(len(ranks[0])):
        shares = [_flat(per_rank[r][step]) for r in range(4)]
        union = [i for share in shares for i in share]
        assert len(set(union)) == 16  # disjoint shares
        assert union == ranks[0].global_batch_indices(step).tolist()
        seen_by_epoch[step // 4].extend(union)
    assert sorted(seen_by_epoch[0]) == sorted(seen_by_epoch[1]) == list(range(64))
    assert seen_by_epoch[0] != seen_by_epoch[1]  # a new order each epoch


def test_tp_pp_ranks_of_one_dp_rank_see_the_same_data():
    """Only the DP rank enters the sampler: every model-parallel peer builds the same one."""
    a = GlobalBatchSampler(50, 8, 4, dp_rank=0, dp_size=2, seed=9)
    b = GlobalBatchSampler(50, 8, 4, dp_rank=0, dp_size=2, seed=9)
    assert _steps(a) == _steps(b)


def test_exact_resume_even_with_another_dp_size():
    full = _steps(GlobalBatchSampler(200, 8, 2, dp_rank=0, dp_size=2, seed=5, epochs=3))
    first = GlobalBatchSampler(200, 8, 2, dp_rank=0, dp_size=2, seed=5, epochs=3)
    done = _steps(first, 30)  # crosses the epoch boundary (25 steps per epoch)
    state = first.state_dict()
    resumed = GlobalBatchSampler(200, 8, 2, dp_rank=0, dp_size=2, seed=5, epochs=3)
    resumed.load_state_dict(state)
    assert done + _steps(resumed) == full
    # Four DP ranks after a restart: their union is still the next global batch.
    wider = [GlobalBatchSampler(200, 8, 1, dp_rank=r, dp_size=4, seed=5, epochs=3)
             for r in range(4)]
    for s in wider:
        s.load_state_dict(state)
    union = [i for s in wider for i in _flat(next(iter(s)))]
    assert union == first.global_batch_indices(30).tolist()
    with pytest.raises(ValueError, match="seed"):
        GlobalBatchSampler(200, 8, 2, 0, 2, seed=6).load_state_dict(state)


def test_errors():
    with pytest.raises(ValueError, match="not divisible by micro_batch 3 x data-parallel size 2"):
        GlobalBatchSampler(100, 16, 3, dp_rank=0, dp_size=2, seed=0)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        GlobalBatchSampler(10, 16, 2, dp_rank=0, dp_size=2, seed=0)
    with pytest.raises(ValueError, match="dp_rank"):
        GlobalBatchSampler(100, 16, 2, dp_rank=2, dp_size=2, seed=0)
