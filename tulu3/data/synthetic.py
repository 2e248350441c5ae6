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


def add_answer(a: int, b: int) -> str:
    return f"{a} + {b} = {a + b}. The answer is {a + b}."


def _task(rng: random.Random) -> tuple[str, str, str]:
    """(kind, prompt, correct answer) for one random task."""
    kind = rng.choice(("reverse", "count", "add"))
    if kind == "reverse":
        words = rng.sample(WORDS, rng.randint(2, 5))
        return kind, f"Reverse these words: {' '.join(words)}", " ".join(reversed(words))
    if kind == "count":
        n = rng.randint(2, 9)
        return kind, f"Count to {n}.", " ".join(str(i) for i in range(1, n + 1))
    a, b = _addition(rng, held_out=False)
    return kind, f"What is {a} + {b}?", add_answer(a, b)


def _corrupt(rng: random.Random, kind: str, answer: str) -> str:
    """A plausible wrong answer of the same shape."""
    if kind == "add":
        total = int(answer.rsplit(" ", 1)[1].rstrip("."))
        wrong = total + rng.choice([-1, 1]) * rng.randint(1, 9)
        return answer.replace(str(total), str(wrong))
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
    rng = random.Random(f"dpo-{seed}")
    rows = []
    for i in range(n):
        kind, prompt, answer = _task(rng)
        user = {"role": "user", "content": prompt}
        rows.append({"id": f"synthetic-dpo-{seed}-{i}", "source": f"synthetic_{kind}",
                     "prompt": prompt,
                     "chosen": [user, {"role": "assistant", "content": answer}],
                     "rejected": [user, {"role": "assistant",
                                         "content": _corrupt(rng, kind, answer)}]})
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
