"""Peak memory of the streaming converters on a multi-GB random Llama checkpoint.

    python tests/benchmarks/bench_convert.py --dir /tmp/bench_convert [--tp 1 8] [--verify]

Writes a random Llama-3.2-1B-shaped HF checkpoint (1.24 B params, bf16, 2.5 GB; tensors are
generated and written one at a time with safetensors' format, no transformers), then runs
``hf_to_megatron`` at each ``--tp`` and ``megatron_to_hf`` back, each in a fresh child process
that reports its RSS after imports (baseline) and its peak RSS (``VmHWM``). ``--verify``
compares the round trip with the source tensor by tensor (streaming too).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from tulu3.model.presets import LlamaShape, padded_vocab

SHAPE = LlamaShape(layers=16, hidden=2048, heads=32, kv_heads=8, ffn_hidden=8192, vocab=128256,
                   tied_embeddings=True)  # Llama 3.2 1B


def make_source(path: Path, shape: LlamaShape) -> int:
    """Random bf16 HF directory; returns its tensor bytes."""
    from tulu3.checkpoint.hf_config import expected_hf_shapes, hf_config_for
    from tulu3.checkpoint.hf_io import ShardedSafetensorsWriter, TensorSpec

    path.mkdir(parents=True, exist_ok=True)
    specs = [TensorSpec(n, s, torch.bfloat16) for n, s in expected_hf_shapes(shape).items()]
    writer = ShardedSafetensorsWriter(path, specs, max_shard_bytes=2 * 10**9)
    gen = torch.Generator().manual_seed(0)
    for spec in specs:
        writer.write(spec.name, (torch.rand(spec.shape, generator=gen) - 0.5).to(torch.bfloat16))
    writer.close()
    (path / "config.json").write_text(json.dumps(hf_config_for(shape, "bfloat16")))
    return sum(s.nbytes for s in specs)


def largest_group_bytes(shape: LlamaShape, tp: int) -> int:
    """Bytes of the largest megatron global tensor (= the HF tensors it is built from), bf16."""
    d, h = shape.head_dim, shape.hidden
    groups = [padded_vocab(shape.vocab, tp) * h, (shape.heads + 2 * shape.kv_heads) * d * h,
              2 * shape.ffn_hidden * h, h * shape.ffn_hidden]
    return max(groups) * 2


def peak_rss() -> int:
    """This process's peak RSS in bytes: ``VmHWM`` (reset by exec, unlike ``ru_maxrss``, which
    keeps the forking parent's high-water mark)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: best effort


def child(mode: str, src: str, out: str, tp: int) -> None:
    """Run one conversion in this process and print its memory as JSON."""
    import psutil

    from tulu3.checkpoint.errors import hf_to_megatron, megatron_to_hf

    baseline = psutil.Process().memory_info().rss
    start = time.perf_counter()
    if mode == "hf2m":
        hf_to_megatron.convert(src, out, tp=tp, pp=1, force=True, quiet=True)
    else:
        megatron_to_hf.export(src, out, force=True, quiet=True)
    peak = peak_rss()
    print(json.dumps({"baseline": baseline, "peak": peak, "seconds": time.perf_counter() - start}))


def run_child(mode: str, src: Path, out: Path, tp: int) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, str(src), str(out), str(tp)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def verify(a: Path, b: Path) -> None:
    from tulu3.checkpoint.hf_io import HFReader

    left, right = HFReader(a), HFReader(b)
    assert sorted(left.names()) == sorted(right.names())
    for name in left.names():
        assert torch.equal(left.read(name), right.read(name)), name


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default="/tmp/bench_convert")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--verify", action="store_true")
    parser.add_argument("--child", nargs=4, metavar=("MODE", "SRC", "OUT", "TP"))
    args = parser.parse_args()
    if args.child:
        mode, src, out, tp = args.child
        child(mode, src, out, int(tp))
        return
    root = Path(args.dir)
    src = root / "hf"
    if not (src / "config.json").is_file():
        make_source(src, SHAPE)
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    mib = 2**20
    print(f"source: {size / 1e9:.2f} GB ({SHAPE})")
    for tp in args.tp:
        group = largest_group_bytes(SHAPE, tp)
        for mode, a, b in (("hf2m", src, root / f"ckpt_tp{tp}"),
                           ("m2hf", root / f"ckpt_tp{tp}", root / f"hf_back_tp{tp}")):
            r = run_child(mode, a, b, tp)
            own = r["peak"] - r["baseline"]
            print(f"{mode} tp={tp}: peak RSS {r['peak'] / mib:.0f} MiB (baseline after imports "
                  f"{r['baseline'] / mib:.0f} MiB, conversion's own {own / mib:.0f} MiB = "
                  f"{own / group:.2f} x largest group {group / mib:.0f} MiB, "
                  f"{r['peak'] / size:.2f} x checkpoint), {r['seconds']:.1f} s")
        if args.verify:
            verify(src, root / f"hf_back_tp{tp}")
            print(f"tp={tp}: round trip bit-exact")


if __name__ == "__main__":
    main()
