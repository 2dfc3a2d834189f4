#!/usr/bin/env bash
# The GPU check, one script for a machine with CUDA GPUs (run from anywhere; it works in the repository root):
# the GPU tier (tests/gpu: the one-GPU tests, and the two-GPU tier tests/gpu/test_multi_gpu.py where at least two
# GPUs are visible; it skips on one) and the one-GPU benchmark bench/gpu.py.
#
#     OUT=gpu-results bash scripts/gpu_check.sh      # about 8 minutes on one H100
#
# Writes under $OUT (default bench/.cache/gpu-check): devices.txt (nvidia-smi, torch), gpu-tests.log and gpu-tests.xml (every
# test's outcome and wall time), bench-gpu.log, gpu.json and gpu.md (the benchmark's results). Each part has a time
# bound (GPU_TESTS_TIMEOUT, GPU_BENCH_TIMEOUT, seconds) so the whole check ends in time; exit 0 only if both passed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
out=${OUT:-bench/.cache/gpu-check}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{ nvidia-smi || echo "nvidia-smi: not available"
  python3 -c "import torch; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '| GPUs', torch.cuda.device_count())"
} > "$out/devices.txt" 2>&1
cat "$out/devices.txt"
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
# one GPU: ~5 min of tests + ~2.5 min of benchmark; two or more add the two-GPU tier (~4 min more)
tests_limit=${GPU_TESTS_TIMEOUT:-$([ "$gpus" -ge 2 ] && echo 570 || echo 330)}

timeout "$tests_limit" python3 -m pytest -q -p no:cacheprovider tests/gpu -rs --durations=0 --junitxml="$out/gpu-tests.xml" \
    2>&1 | tee "$out/gpu-tests.log"
tests=${PIPESTATUS[0]}
timeout "${GPU_BENCH_TIMEOUT:-150}" python3 bench/gpu.py 2>&1 | tee "$out/bench-gpu.log"
bench=${PIPESTATUS[0]}
cp bench/results/gpu.json bench/results/gpu.md "$out/" 2>/dev/null || true

echo "gpu-check: $gpus GPU(s) | tests/gpu exit $tests | bench/gpu.py exit $bench (124: ran past its time bound) | results in $out"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
