"""RLVR learning on the synthetic task, several seeds: verified fraction before / after.

    python tests/benchmarks/bench_rlvr_learning.py [--seeds 1 2 3] [--steps 10] [--out DIR]

One process (CPU): the tiny Llama is SFT-ed once on single-digit additions answered in two
styles, only one of which the gsm8k verifier accepts (tests/stages/rlvr/rlvr_harness.py); then
GRPO and PPO run from that checkpoint for every seed. Reported per run: the verified fraction
of the rollouts (sampled, temperature 1) over the first and last 3 rollout batches, and the
greedy accuracy on 40 eval prompts before (``tulu3.eval`` of the SFT checkpoint) and after (the
loop's final eval). Plots: OUT/<algo>_<seed>/rlvr_reward.png, rlvr_kl.png.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parents[1] / d) for d in ("trainer", "stages/rlvr")]

from rlvr_harness import learn, make_data  # noqa: E402

from tulu3.testing import run_distributed_test  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", help="run directory (default: a temporary one)")
    args = parser.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="rlvr_learning_"))
    data = make_data(root)
    started = time.monotonic()
    result = run_distributed_test(learn, 1, data, root / "learn", tuple(args.seeds), args.steps,
                                  timeout_s=3600)[0]
    print(f"SFT checkpoint greedy eval accuracy (before): {result['before']:.3f}")
    print("| algo | seed | rollout verified, first 3 batches | last 3 | eval before | after |")
    print("|---|---|---|---|---|---|")
    for (algo, seed), records in ((k, v) for k, v in result.items() if isinstance(k, tuple)):
        if isinstance(records, str):
            print(f"| {algo} | {seed} | failed: {records} |")
            continue
        verified = [r["verified"] for r in records]
        print(f"| {algo} | {seed} | {sum(verified[:3]) / 3:.3f} | {sum(verified[-3:]) / 3:.3f} "
              f"| {result['before']:.3f} | {records[-1]['eval/verified']:.3f} |")
    print(f"wall {time.monotonic() - started:.0f} s; runs in {root / 'learn'}")


if __name__ == "__main__":
    main()
