#!/usr/bin/env bash
# Issue 22's device check: every GPU measurement in one prepared run, printing as it goes.
# On the lent H200 (Python 3.12, torch 2.11, no megatron-core: carry it as a cp312 wheel, see the
# device tool's README; then start with the pip line it gives and `export PYTHONPATH=/tmp/site:.`):
#   bash launch/gpu_check.sh "$OUT"
# The same steps at tiny shapes on CPU (its test, tests/launch/test_gpu_check.py):
#   GPU_CHECK_TINY=1 bash launch/gpu_check.sh runs/gpu_check
# Shapes (issue 22): 8 layers of Llama 3.1 8B, vocab 128256, seq 4096, micro-batch 2, bf16.
# Not prepared yet: item 7 (the planner's memory for this 8-layer slice vs the measured peak).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu_check}
mkdir -p "$out"
if [ "${GPU_CHECK_TINY:-0}" = 1 ]; then
  export TRITON_INTERPRET=1  # Triton kernels in the interpreter (no GPU)
  step=(--tiny --steps 2 --warmup 1)
  attention=(--seq 256 --docs 4 --heads 4 --kv-heads 2 --head-dim 16 --repeat 1)
  kernels=(--tokens 256 --hidden 64 --vocab 512 --repeat 1)
  generate=(--layers 2 --hidden 64 --heads 4 --kv-heads 2 --ffn 128 --vocab 512 --batch 4
            --prompt-len 8 --new-tokens 8 --repeat 1)
else
  step=()
  attention=(--seq 4096 --docs 8 --heads 32 --kv-heads 8 --head-dim 128 --device cuda
             --dtype bfloat16)
  kernels=(--tokens 16384 --hidden 4096 --vocab 128256 --dtype bf16 --impl "reference,chunked,triton")
  generate=(--layers 8 --hidden 4096 --heads 32 --kv-heads 8 --ffn 14336 --vocab 128256 --batch 64
            --prompt-len 128 --new-tokens 256 --device cuda --dtype bf16)
fi
failed=0
run() {  # run NAME COMMAND...: print a header and the time, keep going after a failure
  local name=$1
  shift
  echo "=== $name ($(date -u +%H:%M:%S))"
  "$@" || { echo "=== $name FAILED (exit $?)"; failed=$((failed + 1)); }
}
run "1. training step: tulu3 vs HF transformers" \
  python tests/benchmarks/bench_step.py "${step[@]}" --out "$out/step.json"
run "2. packed attention: FlexAttention vs dense mask vs unpacked" \
  python tests/benchmarks/bench_attention.py "${attention[@]}"
run "3. FP8 (model.fp8=current, torch spec) step" \
  python tests/benchmarks/bench_step.py "${step[@]}" --set model.fp8=current --out "$out/step_fp8.json"
run "4. fused RMSNorm / SwiGLU / RoPE step" \
  python tests/benchmarks/bench_step.py "${step[@]}" --set model.fused=all --out "$out/step_fused.json"
run "5. fused log-prob kernel vs naive" python -m kernels.bench "${kernels[@]}"
if [ "${GPU_CHECK_TINY:-0}" != 1 ]; then
  run "5b. compiled Triton kernels" python -m pytest -q -p no:cacheprovider tests/kernels
fi
run "6. rollout engine vs HF generate" \
  python tests/benchmarks/bench_generate.py "${generate[@]}" --json "$out/generate.json"
echo "=== done ($(date -u +%H:%M:%S)): $out, $failed failed"
exit $((failed > 0))
