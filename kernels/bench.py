"""Peak memory and time of one forward + backward of the log-prob, fused vs naive.

    python -m kernels.bench --tokens 16384 --hidden 4096 --vocab 128256 --dtype bf16 \\
        --impl reference,triton --device cuda
    python -m kernels.bench --tokens 2048 --hidden 512 --vocab 32000 --dtype fp32 \\
        --impl reference,chunked --device cpu

``--impl`` takes ``kernels.linear_logprobs``'s values; ``reference`` is the naive path (matmul in
the inputs' dtype, fp32 log-softmax, gather, autograd backward). Each implementation runs in a
fresh process so one's allocator caches cannot hide the other's peak.

What is measured: the loss is ``-mean(logprobs)`` (plus ``-mean(entropy)`` with ``--entropy``);
time is the median of ``--repeat`` forward + backward passes after one warm-up; peak memory is
the peak above the memory held once the inputs exist, over the warm-up and the timed passes, so
it includes the gradients of hidden and weight.
- CUDA: ``torch.cuda.max_memory_allocated()`` (the caching allocator's live tensors).
- CPU (Linux, glibc): the process's peak resident set (``VmHWM``, reset through
  ``/proc/self/clear_refs`` once the inputs exist) minus the resident set at that moment, with
  glibc's mmap threshold pinned at 128 KiB so freed tensors leave the resident set. Every
  allocation counts, PyTorch's and the libraries', so small shapes carry a few MiB of noise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from kernels.logprobs import IMPLS, linear_logprobs
from kernels.memory import peak_bytes, pin_malloc_mmap_threshold, start_peak_window

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MIB = 1 << 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--impl", default="reference,chunked",
                        help=f"comma-separated, from {IMPLS}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--entropy", action="store_true", help="also backprop through entropy")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="one JSON line per implementation")
    args = parser.parse_args(argv)
    for impl in args.impl.split(","):
        if impl not in IMPLS:
            parser.error(f"unknown impl {impl!r}; choose from {IMPLS}")
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(hidden, weight, labels, impl: str, entropy: bool) -> None:
    hidden.grad = weight.grad = None
    logprobs, ent = linear_logprobs(hidden, weight, labels, with_entropy=entropy, impl=impl)
    loss = -logprobs.mean() - (ent.mean() if entropy else 0.0)
    loss.backward()


def measure(tokens: int, hidden_size: int, vocab: int, dtype: torch.dtype, impl: str,
            device: str, entropy: bool = False, repeat: int = 3) -> dict:
    """One implementation in this process -> {"impl", "peak_mib", "median_ms", "times_ms"}."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=gen, device=device).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=gen, device=device)
              / hidden_size**0.5).to(dtype)
    labels = torch.randint(0, vocab, (tokens,), generator=gen, device=device)
    hidden.requires_grad_()
    weight.requires_grad_()
    _sync(device)
    if device.type != "cuda":
        pin_malloc_mmap_threshold()
    base = start_peak_window(device)
    times = []
    for i in range(repeat + 1):
        start = time.perf_counter()
        _step(hidden, weight, labels, impl, entropy)
        _sync(device)
        if i:  # the first pass is the warm-up (Triton compiles, allocators grow)
            times.append((time.perf_counter() - start) * 1e3)
    peak = peak_bytes(device) - base
    return {"impl": impl, "peak_mib": peak / MIB, "median_ms": statistics.median(times),
            "times_ms": times}


def _run_child(args: argparse.Namespace, impl: str) -> dict:
    cmd = [sys.executable, "-m", "kernels.bench", "--json", "--impl", impl,
           "--tokens", str(args.tokens), "--hidden", str(args.hidden), "--vocab", str(args.vocab),
           "--dtype", args.dtype, "--device", args.device, "--repeat", str(args.repeat)]
    if args.entropy:
        cmd.append("--entropy")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    impls = args.impl.split(",")
    if len(impls) == 1:
        results = [measure(args.tokens, args.hidden, args.vocab, DTYPES[args.dtype], impls[0],
                           args.device, args.entropy, args.repeat)]
    else:
        results = [_run_child(args, impl) for impl in impls]
    if args.json:
        for r in results:
            print(json.dumps(r))
        return results
    print(f"tokens {args.tokens} x hidden {args.hidden} x vocab {args.vocab}, {args.dtype}, "
          f"{args.device}, forward + backward{' + entropy' if args.entropy else ''}")
    print(f"{'impl':<10} {'peak MiB':>10} {'median ms':>10}")
    for r in results:
        print(f"{r['impl']:<10} {r['peak_mib']:>10.1f} {r['median_ms']:>10.1f}")
    return results


if __name__ == "__main__":
    main()
