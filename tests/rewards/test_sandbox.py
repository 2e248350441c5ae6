"""VerifierPool: time limits, crashes, hostile inputs, and use inside a torch.distributed process.

The verifiers registered here are found by pool workers by importing this module (pytest puts
tests/rewards on sys.path, and the pool hands its sys.path to workers).
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tulu3.rewards import VerifierPool, VerifyResult, register_verifier, verify
from tulu3.rewards.sandbox import PoolStats

TIMEOUT_S = 1.5
GRACE_S = 0.5
PWNED = "/tmp/tulu3_rewards_pwned"
SLEEP_S = 60  # how long the hanging verifiers sleep


@register_verifier("test_sleepy")
def sleepy(response: str, ground_truth: str) -> bool:
    """Hangs in Python: the worker's own timer interrupts it, the worker survives."""
    time.sleep(SLEEP_S)
    return True


@register_verifier("test_stuck")
def stuck(response: str, ground_truth: str) -> bool:
    """Hangs with SIGALRM blocked (like C code that never checks signals): must be killed."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    time.sleep(SLEEP_S)
    return True


@register_verifier("test_raises")
def raises(response: str, ground_truth: str) -> bool:
    raise ValueError("boom")


@register_verifier("test_exits")
def exits(response: str, ground_truth: str) -> bool:
    os._exit(3)


@register_verifier("test_hog")
def hog(response: str, ground_truth: str) -> bool:
    """Asks for 64 GB: the worker's address-space cap turns that into a MemoryError."""
    return len(bytearray(64 * 1024**3)) > 0


@register_verifier("test_catches_everything")
def catches_everything(response: str, ground_truth: str) -> VerifyResult:
    """A verifier that swallows Exception must still time out (the timeout is a BaseException)."""
    try:
        time.sleep(SLEEP_S)
    except Exception:  # noqa: BLE001 - the point of this verifier
        return VerifyResult(True, None, "swallowed")
    return VerifyResult(True, None, "slept")


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(workers=2, timeout_s=TIMEOUT_S, kill_grace_s=GRACE_S) as p:
        yield p


def test_scores_match_in_process_verify(pool: VerifierPool) -> None:
    items = [("gsm8k", "so 72.", "72"), ("MATH", r"$\boxed{\dfrac12}$", "0.5"),
             ("math", r"$\boxed{3}$", "4"),
             ("ifeval", "hello", json.dumps({"func_name": "validate_lowercase"})),
             ("gsm8k", "-5", "5")] * 3
    assert pool.score(items) == [verify(*item) for item in items]
    assert pool.score([]) == []


def test_hung_verifier_times_out_and_the_worker_survives(pool: VerifierPool) -> None:
    before = pool.stats
    items = [("test_sleepy", "", ""), ("gsm8k", "1", "1"), ("test_catches_everything", "", ""),
             ("gsm8k", "2", "2")]
    start = time.monotonic()
    results = pool.score(items)
    assert [r.reason for r in results] == ["timeout", "match", "timeout", "match"]
    # the verifiers sleep 60 s; well under that proves the time limit cut them (not how fast:
    # a loaded 2-core CI machine may take seconds to schedule the workers)
    assert time.monotonic() - start < SLEEP_S / 2
    after = pool.stats
    assert after.timeouts - before.timeouts == 2 and after.restarts == before.restarts


def test_stuck_worker_is_killed_and_replaced(pool: VerifierPool) -> None:
    before = pool.stats
    start = time.monotonic()
    results = pool.score([("test_stuck", "", ""), ("gsm8k", "3", "3"), ("gsm8k", "4", "5")])
    assert results[0].reason == "timeout"
    assert results[1].correct and not results[2].correct
    assert time.monotonic() - start < SLEEP_S / 2  # killed, not slept out (+ a replacement)
    assert pool.stats.restarts == before.restarts + 1
    assert pool.score([("gsm8k", "6", "6")] * 4) == [verify("gsm8k", "6", "6")] * 4


def test_crashing_verifiers_score_zero_and_are_counted(pool: VerifierPool) -> None:
    before = pool.stats
    # The dying item goes last, so no other item waits for the replacement worker to start.
    results = pool.score([("gsm8k", "7", "7"), ("test_raises", "", ""), ("test_hog", "", ""),
                          ("test_exits", "", "")])
    assert results[0].correct
    assert results[1] == VerifyResult(False, None, "error: ValueError: boom")
    assert results[2] == VerifyResult(False, None, "error: MemoryError: ")
    assert results[3].reason == "error: worker died (exit code 3)" and not results[3].correct
    after = pool.stats
    assert after.errors - before.errors == 3 and after.restarts - before.restarts == 1


def test_an_interrupted_score_leaks_nothing_into_the_next(pool: VerifierPool, monkeypatch) -> None:
    collect = pool._collect

    def interrupted(*args):
        collect(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(pool, "_collect", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pool.score([("test_sleepy", "", "")] + [("gsm8k", "1", "2")] * 40)
    monkeypatch.undo()
    assert not any(w.inflight for w in pool._workers)
    items = [("gsm8k", str(i), str(i)) for i in range(20)]
    assert pool.score(items) == [verify(*item) for item in items]


def test_bad_ground_truth_is_an_error_not_a_crash(pool: VerifierPool) -> None:
    result = pool.score([("ifeval", "x", "{not json")])[0]
    assert result.errored and not result.correct


def test_adversarial_inputs(pool: VerifierPool) -> None:
    """Hostile responses end in time with a result: the cheap ones through the guards (no
    timeout), the megabyte ones within the time limit or as a timeout, never a crash."""
    if os.path.exists(PWNED):
        os.remove(PWNED)
    payload = f"__import__('os').system('touch {PWNED}')"
    guarded = [
        ("math", r"$\boxed{9^{9^{9^{9}}}}$", "1"),
        ("math", "9**9**9**9", "1"),
        ("gsm8k", "9**9**9**9", "1"),
        ("math", "\\boxed{" * 10_000, "1"),
        ("math", r"\boxed{" + "(" * 10_000 + "1" + ")" * 10_000 + "}", "1"),
        ("math", r"\boxed{100000!}", "1"),
        ("math", payload, "0"),
        ("gsm8k", payload, "0"),
        ("ifeval", payload, json.dumps({"func_name": "validate_title"})),
    ]
    megabyte = 1_000_000
    ifeval_gt = json.dumps({"instruction_id_list": ["language:response_language",
                                                    "length_constraints:number_sentences",
                                                    "length_constraints:number_paragraphs"],
                            "kwargs": [{"language": "en"},
                                       {"num_sentences": 3, "relation": "at least"},
                                       {"num_paragraphs": 2}]})
    big = [
        ("gsm8k", "1 " * (megabyte // 2), "2"),
        ("math", ("x" * 99 + "$") * (megabyte // 100), "1"),
        ("math", "{" * megabyte, "1"),
        ("ifeval", "*" * megabyte, ifeval_gt),
        ("ifeval", "word " * (megabyte // 5), ifeval_gt),
    ]
    start = time.monotonic()
    results = pool.score(guarded + big)
    elapsed = time.monotonic() - start
    assert all(not r.correct and not r.errored for r in results), results
    assert all(not r.timed_out for r in results[:len(guarded)]), results
    assert elapsed < len(results) * (TIMEOUT_S + GRACE_S)
    assert not os.path.exists(PWNED)


def test_unknown_and_unimportable_verifiers_are_refused(pool: VerifierPool) -> None:
    with pytest.raises(ValueError, match="no verifier"):
        pool.score([("nope", "", "")])

    @register_verifier("test_local")
    def local(response: str, ground_truth: str) -> bool:
        return True

    with pytest.raises(ValueError, match="importable"):
        pool.score([("test_local", "", "")])


def test_close_stops_workers_even_while_they_start() -> None:
    p = VerifierPool(workers=2, timeout_s=TIMEOUT_S)
    procs = [w.proc for w in p._workers]
    start = time.monotonic()
    p.close()
    assert time.monotonic() - start < 5.0
    assert all(proc.poll() is not None for proc in procs)
    with pytest.raises(RuntimeError, match="closed"):
        p.score([("gsm8k", "1", "1")])
    assert p.stats == PoolStats()


def test_import_is_light() -> None:
    code = ("import sys, tulu3.rewards; "
            "print(sorted(m for m in ('sympy', 'langdetect', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _score_inside_rank() -> list[float]:
    """Runs in a gloo rank: the pool must start and work, and gloo must still work after."""
    import torch
    import torch.distributed as dist

    with VerifierPool(workers=1, timeout_s=5.0) as p:
        results = p.score([("gsm8k", "72", "72"), ("math", r"\boxed{\frac12}", "0.5"),
                           ("math", r"\boxed{2}", "3")])
    correct = torch.tensor([float(sum(r.correct for r in results))])
    dist.all_reduce(correct)
    return [correct.item()]


@pytest.mark.distributed
def test_pool_inside_a_torch_distributed_process() -> None:
    from tulu3.testing import run_distributed_test

    assert run_distributed_test(_score_inside_rank, 2, timeout_s=120) == [[4.0], [4.0]]
