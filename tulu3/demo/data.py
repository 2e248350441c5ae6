"""``python -m tulu3.demo.data --out DIR``: a tiny tokenizer and Tülu-format data, no downloads.

Writes DIR/tokenizer.model (a Llama-3-format tiktoken file learned from the synthetic corpus),
sft.jsonl, sft_eval.jsonl, dpo.jsonl, dpo_eval.jsonl, rlvr.jsonl and eval.jsonl (held-out
two-digit additions, RLVR format), the demo's verifiable task: add_sft.jsonl, add_rlvr.jsonl,
add_eval.jsonl (single-digit additions; see synthetic.small_addition_rows), and the reward
model's preference set: rm.jsonl, rm_eval.jsonl (synthetic.rm_rows; held-out sums). The tiny
recipes in launch/recipes/ read these paths.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tulu3.data.loading import write_jsonl
from tulu3.data.synthetic import (
    dpo_rows,
    rm_rows,
    sft_rows,
    small_addition_rows,
    tokenizer_corpus,
    write_splits,
)
from tulu3.data.tokenizer import build_tiny_tiktoken

DEFAULT_DIR = "runs/tiny/data"
MERGES = 240
RM_PAIRS, RM_EVAL_PAIRS = 64_000, 256  # tiny-rm-scratch.yaml: 1,000 steps of 64 fresh pairs


def make_tiny_data(out_dir: str | Path = DEFAULT_DIR, seed: int = 0, n_sft: int = 512,
                   n_dpo: int = 256, n_rlvr: int = 256, n_eval: int = 64,
                   n_rm: int = RM_PAIRS) -> dict[str, str]:
    """Write the tokenizer and every split (idempotent for a given seed); returns name -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = write_splits(out, seed, n_sft, n_dpo, n_rlvr, n_eval)
    paths["sft_eval"] = write_jsonl(sft_rows(n_eval, seed + 1), out / "sft_eval.jsonl")
    paths["dpo_eval"] = write_jsonl(dpo_rows(n_eval, seed + 1), out / "dpo_eval.jsonl")
    # The verifiable task of the demo's RLVR stage (tulu3.data.synthetic.small_addition_rows).
    paths["add_sft"] = write_jsonl(small_addition_rows(4096, seed + 1, True),
                                   out / "add_sft.jsonl")
    paths["add_rlvr"] = write_jsonl(small_addition_rows(512, seed + 2, False),
                                    out / "add_rlvr.jsonl")
    paths["add_eval"] = write_jsonl(small_addition_rows(40, seed + 3, False),
                                    out / "add_eval.jsonl")
    paths["rm"] = write_jsonl(rm_rows(n_rm, seed), out / "rm.jsonl")
    paths["rm_eval"] = write_jsonl(rm_rows(RM_EVAL_PAIRS, seed + 1, held_out=True),
                                   out / "rm_eval.jsonl")
    tokenizer = out / "tokenizer.model"
    if not tokenizer.exists():
        build_tiny_tiktoken(str(tokenizer), tokenizer_corpus(seed=seed), MERGES)
    paths["tokenizer"] = str(tokenizer)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DEFAULT_DIR)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name, path in make_tiny_data(args.out, args.seed).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
