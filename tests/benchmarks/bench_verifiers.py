"""Throughput of the verifiers: responses scored per second for GSM8K, MATH and IFEval mixes.

    python tests/benchmarks/bench_verifiers.py [--n 2000] [--workers 2]

Measures (1) ``verify`` in this process, one core, and (2) ``VerifierPool`` with ``--workers``
processes, start-up excluded (reported separately). The mixes are synthetic but shaped like RLVR
rollouts: chain-of-thought text of a few hundred characters, about half correct, answers in the
forms models produce (``\\dfrac`` vs ``0.5``, thousands separators, units, ``x = 3``), and for MATH
a share that only sympy can settle (radicals, polynomials). Parameters are random, so caches do
not make repeated items free.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from tulu3.rewards import VerifierPool, verify

FILLER = ("Let me think step by step. First we note the quantities given in the problem and "
          "write down what is asked. Then we combine them carefully. ")


def gsm8k_item(rng: random.Random) -> tuple[str, str, str]:
    answer = rng.randint(-50, 20_000)
    said = answer if rng.random() < 0.5 else answer + rng.choice([-1, 1, 10])
    form = rng.choice(["{:,}", "${:,}", "{} dollars", "{}.", "{}.0"])
    steps = " ".join(f"{rng.randint(1, 99)} + {rng.randint(1, 99)} = {rng.randint(2, 198)}."
                     for _ in range(rng.randint(2, 6)))
    text = f"{FILLER}{steps} So the answer is {form.format(said)}"
    truth = f"Step one.\nStep two <<1+1=2>>.\n#### {answer}" if rng.random() < 0.5 else str(answer)
    return "gsm8k", text, truth


def _math_answer(rng: random.Random) -> tuple[str, str, str]:
    """(ground truth, an equivalent form, a wrong answer) of a random MATH answer type."""
    kind = rng.random()
    a, b = rng.randint(1, 30), rng.randint(2, 31)
    if kind < 0.35:
        n = rng.randint(-100, 5000)
        return str(n), rng.choice([f"{n:,}", f"x = {n}", f"{n}"]), str(n + 1)
    if kind < 0.6:
        return rf"\frac{{{a}}}{{{b}}}", rng.choice([rf"\dfrac{{{a}}}{{{b}}}", f"{a}/{b}"]), \
            rf"\frac{{{a + 1}}}{{{b}}}"
    if kind < 0.8:  # only sympy settles these
        return (rng.choice([rf"\frac{{\sqrt{{{a}}}}}{{{b}}}", rf"x^2+{2 * a}x+{a * a}"]),
                rng.choice([rf"\sqrt{{{a}}}/{b}", rf"(x+{a})^2"]), rf"\sqrt{{{a + 1}}}")
    if kind < 0.9:
        return rf"[{a}, {a + b})", rf"\left[ {a},{a + b} \right)", rf"({a}, {a + b})"
    letter = rng.choice("ABCDE")
    return rf"\text{{({letter})}}", f"({letter})", r"\text{(F)}"


def math_item(rng: random.Random) -> tuple[str, str, str]:
    truth, same, wrong = _math_answer(rng)
    said = same if rng.random() < 0.5 else wrong
    style = rng.random()
    if style < 0.8:
        tail = rf"Therefore the answer is $\boxed{{{said}}}$."
    elif style < 0.95:
        tail = f"Final Answer: The final answer is ${said}$. I hope it is correct."
    else:
        tail = "I am not sure how to finish."
    return "math", FILLER * rng.randint(1, 3) + rf"We get $y = {rng.randint(1, 9)}$. " + tail, truth


def ifeval_item(rng: random.Random) -> tuple[str, str, str]:
    n = rng.randint(2, 5)
    body = "\n\n".join(f"paragraph {i} talks about rivers and rain." for i in range(n))
    gt = rng.choice([
        {"func_name": "validate_lowercase"},
        {"func_name": "validate_paragraphs", "N": n, "i": 1, "first_word": "paragraph"},
        {"func_name": "validate_word_constraint", "N": 20, "quantifier": "at least"},
        {"func_name": "validate_response_language", "language": "en"},
        {"func_name": "validate_no_commas"},
    ])
    return "ifeval", body if rng.random() < 0.7 else body.upper() + ", done", json.dumps(gt)


MIXES = {"gsm8k": gsm8k_item, "math": math_item, "ifeval": ifeval_item}


def bench_in_process(items: list) -> tuple[float, float]:
    """(responses per second of wall time, CPU milliseconds per response). On a shared machine
    the CPU time per response is the steadier figure."""
    start, cpu = time.perf_counter(), time.process_time()
    for item in items:
        verify(*item)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return len(items) / wall, 1000 * cpu / len(items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="responses per mix")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    mixes = {name: [make(rng) for _ in range(args.n)] for name, make in MIXES.items()}
    for items in mixes.values():  # warm imports (sympy, langdetect) out of the measurement
        verify(*items[0])
    start = time.perf_counter()
    pool = VerifierPool(workers=args.workers, timeout_s=5.0)
    pool.score([mixes["gsm8k"][0]])
    startup = time.perf_counter() - start
    print(f"| mix | n | in-process, 1 core (/s) | CPU ms per response "
          f"| VerifierPool, {args.workers} workers (/s) | correct | timeouts |")
    print("|---|---|---|---|---|---|---|")
    for name, items in mixes.items():
        rate_local, cpu_ms = bench_in_process(items)
        start = time.perf_counter()
        results = pool.score(items)
        rate_pool = len(items) / (time.perf_counter() - start)
        correct = sum(r.correct for r in results) / len(results)
        timeouts = sum(r.timed_out for r in results)
        print(f"| {name} | {len(items)} | {rate_local:,.0f} | {cpu_ms:.2f} | {rate_pool:,.0f} "
              f"| {correct:.2f} | {timeouts} |")
    pool.close()
    print(f"\npool start-up (spawn + import sympy/langdetect + warm-up): {startup:.1f} s")


if __name__ == "__main__":
    main()
