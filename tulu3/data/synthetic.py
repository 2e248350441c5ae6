"""Deterministic synthetic Tülu-format data for the demo and the tests.

Three tasks from a tiny fixed grammar, learnable by a model with a few layers:

- reverse: "Reverse these words: sun cat red" -> "red cat sun"
- count:   "Count to 5." -> "1 2 3 4 5"
- add:     "What is 23 + 45?" -> "23 + 45 = 68. The answer is 68."

SFT rows are chats (some with a system turn, some two-turn); DPO rows pair the right answer (chosen)
with a corrupted one (rejected); RLVR rows are additions with ``ground_truth`` the sum and
``dataset`` "gsm8k" (its verifier takes the last number). Additions whose operands satisfy
:func:`is_eval_pair` (one in ten) appear only in the eval split, so eval scores measure
generalisation, not recall. Same seed, same rows.
"""

from __future__ import annotations

import random
from pathlib import Path

from tulu3.data.loading import write_jsonl

WORDS = ("sun", "moon", "cat", "dog", "red", "blue", "tree", "fish", "bird", "star", "rain",
         "snow", "book", "lamp", "cup", "hat", "ship", "road", "milk", "bread")
SYSTEM = "You are a helpful assistant."


def is_eval_pair(a: int, b: int) -> bool:
    """Held-out additions (about 10% of the 90 x 90 two-digit pairs)."""
    return (7 * a + 3 * b) % 10 == 0


def _addition(rng: random.Random, held_out: bool) -> tuple[int, int]:
    while True:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if is_eval_pair(a, b) == held_out:
            return a, b


# Single-digit additions kept out of rm_rows' training split (10 of the 100 operand pairs).
SMALL_HELD_OUT = frozenset(random.Random("rm-held-out").sample(
    [(a, b) for a in range(10) for b in range(10)], 10))


def _small_addition(rng: random.Random, held_out: bool) -> tuple[int, int]:
    while True:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        if ((a, b) in SMALL_HELD_OUT) == held_out:
            return a, b


def add_answer(a: int, b: int) -> str:
    return f"{a} + {b} = {a + b}. The answer is {a + b}."


def _task(rng: random.Random, sums: str = "two_digit") -> tuple[str, str, str]:
    """(kind, prompt, correct answer) for one random task.

    ``sums``: "two_digit" (operands 10..99, never an eval pair), or single-digit operands from the
    training ("small") or held-out ("small_held_out") pairs of :data:`SMALL_HELD_OUT`."""
    kind = rng.choice(("reverse", "count", "add"))
    if kind == "reverse":
        words = rng.sample(WORDS, rng.randint(2, 5))
        return kind, f"Reverse these words: {' '.join(words)}", " ".join(reversed(words))
    if kind == "count":
        n = rng.randint(2, 9)
        return kind, f"Count to {n}.", " ".join(str(i) for i in range(1, n + 1))
    a, b = (_addition(rng, False) if sums == "two_digit"
            else _small_addition(rng, sums == "small_held_out"))
    return kind, f"What is {a} + {b}?", add_answer(a, b)


def _corrupt(rng: random.Random, kind: str, answer: str, small_sums: bool) -> str:
    """A plausible wrong answer of the same shape (``small_sums``: a wrong sum in 0..18)."""
    if kind == "add":
        total = int(answer.rsplit(" ", 1)[1].rstrip("."))
        if small_sums:  # never negative: a minus sign would give the wrong answer away
            wrong = rng.choice([v for v in range(19) if v != total])
        else:
            wrong = total + rng.choice([-1, 1]) * rng.randint(1, 9)
        # Rebuilt, not str.replace(total, wrong): with a zero summand the other equals the sum.
        question = answer.split(" = ", 1)[0]
        return f"{question} = {wrong}. The answer is {wrong}."
    parts = answer.split()
    if kind == "reverse":
        return " ".join(reversed(parts))  # the words in the original order
    del parts[rng.randrange(1, len(parts))]  # count with a number missing
    return " ".join(parts)


def sft_rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` chats ``{"messages": [...]}``: 25% with a system turn, 25% with two exchanges."""
    rng = random.Random(f"sft-{seed}")
    rows = []
    for _ in range(n):
        messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.25 else []
        for _ in range(2 if rng.random() < 0.25 else 1):
            _, prompt, answer = _task(rng)
            messages += [{"role": "user", "content": prompt},
                         {"role": "assistant", "content": answer}]
        rows.append({"messages": messages})
    return rows


def dpo_rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` preference pairs in Tülu 3's layout (id, source, prompt, chosen, rejected)."""
    return _preference_rows(n, f"dpo-{seed}", f"synthetic-dpo-{seed}", "two_digit")


def rm_rows(n: int, seed: int = 0, held_out: bool = False) -> list[dict]:
    """``n`` preference pairs for reward-model tests: :func:`dpo_rows` with single-digit sums.

    Same tasks, layout and corruptions, except that additions take operands 0..9 and the rejected
    sum is any other value in 0..18. ``held_out``: the additions are the operand pairs of
    :data:`SMALL_HELD_OUT`, which the training split (``held_out=False``) never contains.

    Why not dpo_rows: a tiny reward model trained from random weights learns count and reversal
    but not to check two-digit sums in CPU time (measured: 0.48 on held-out two-digit pairs after
    2,000 steps, while reversal reached 0.99).
    """
    sums = "small_held_out" if held_out else "small"
    return _preference_rows(n, f"rm-{seed}-{sums}", f"synthetic-rm-{seed}", sums)


def _preference_rows(n: int, rng_seed: str, id_prefix: str, sums: str) -> list[dict]:
    rng = random.Random(rng_seed)
    rows = []
    for i in range(n):
        kind, prompt, answer = _task(rng, sums)
        user = {"role": "user", "content": prompt}
        rejected = _corrupt(rng, kind, answer, small_sums=sums != "two_digit")
        rows.append({"id": f"{id_prefix}-{i}", "source": f"synthetic_{kind}", "prompt": prompt,
                     "chosen": [user, {"role": "assistant", "content": answer}],
                     "rejected": [user, {"role": "assistant", "content": rejected}]})
    return rows


def _rlvr_row(a: int, b: int) -> dict:
    return {"messages": [{"role": "user", "content": f"What is {a} + {b}?"}],
            "ground_truth": str(a + b), "dataset": "gsm8k"}


def rlvr_rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` two-digit additions (never a held-out pair) for RLVR training."""
    rng = random.Random(f"rlvr-{seed}")
    return [_rlvr_row(*_addition(rng, held_out=False)) for _ in range(n)]


def eval_rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` held-out additions in RLVR format (messages, ground_truth, dataset)."""
    rng = random.Random(f"eval-{seed}")
    return [_rlvr_row(*_addition(rng, held_out=True)) for _ in range(n)]


def tokenizer_corpus(n: int = 300, seed: int = 0) -> list[str]:
    """Texts to train a tiny tokenizer on: the template headers and chats of every task."""
    texts = ["<|system|>\n", "<|user|>\n", "<|assistant|>\n", SYSTEM,
             " ".join(str(i) for i in range(200))]
    for row in sft_rows(n, seed):
        texts += [f"<|{m['role']}|>\n{m['content']}\n" for m in row["messages"]]
    return texts


def write_splits(out_dir: str | Path, seed: int = 0, n_sft: int = 512, n_dpo: int = 256,
                 n_rlvr: int = 256, n_eval: int = 64) -> dict[str, str]:
    """Write sft.jsonl, dpo.jsonl, rlvr.jsonl and eval.jsonl; returns split -> path."""
    out = Path(out_dir)
    splits = {"sft": sft_rows(n_sft, seed), "dpo": dpo_rows(n_dpo, seed),
              "rlvr": rlvr_rows(n_rlvr, seed), "eval": eval_rows(n_eval, seed)}
    return {name: write_jsonl(rows, out / f"{name}.jsonl") for name, rows in splits.items()}


def small_addition_rows(n: int, seed: int, answers: bool) -> list[dict]:
    """Single-digit additions (operands 0..4), the demo's and tests' RLVR task.

    With ``answers``: SFT chats answered in one of two styles, "a + b = c. The answer is c."
    (verified: the gsm8k verifier reads the last number) or "The answer is c = a + b." (not).
    A briefly SFT-ed tiny model gets the sums right but picks either style; RLVR has to find
    the verified one. Without ``answers``: RLVR rows (ground_truth the sum, dataset gsm8k).
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 4), rng.randint(0, 4)
        user = {"role": "user", "content": f"What is {a} + {b}?"}
        if not answers:
            rows.append({"messages": [user], "ground_truth": str(a + b), "dataset": "gsm8k"})
            continue
        reply = add_answer(a, b) if rng.random() < 0.5 else f"The answer is {a + b} = {a} + {b}."
        rows.append({"messages": [user, {"role": "assistant", "content": reply}]})
    return rows
