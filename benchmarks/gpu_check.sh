#!/usr/bin/env bash
# One prepared run for a lent GPU machine (see the device tool): build the extension there, run the
# CUDA op tests and the GPU benchmarks, write everything under $OUT. Budget: under 8 minutes.
#   run: bash benchmarks/gpu_check.sh   (with `carry` not needed: the build happens on the machine)
set -uo pipefail
OUT=${OUT:-/tmp/divfast-gpu}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
nvidia-smi || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
# captum is absent on the GPU image; only the attribution tests need it (none run here yet).
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
time MAX_JOBS=16 python -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 \
  || { echo "BUILD FAILED"; tail -50 "$OUT/build.log"; exit 1; }
# click may be absent there: print the facts without the CLI.
python -c "import json; from divfast.info import collect_info; print(json.dumps(collect_info(), indent=2))" \
  | tee "$OUT/info.json"
python -c "import pytest" 2>/dev/null || echo "pytest is missing on this machine: carry its wheel"
DIVFAST_REQUIRE_EXTENSION=1 DIVFAST_REQUIRE_CUDA=1 timeout 300 python -m pytest -q \
  tests/test_ops_pair_counts.py tests/test_ops_attribution_stats.py tests/test_ops_hsic.py tests/test_ops_ensemble_sweep.py tests/test_ops_registry.py \
  tests/test_attribution_metrics.py -k cuda 2>&1 | tail -30 | tee "$OUT/pytest_cuda.txt"
timeout 120 python -m benchmarks.bench_attribution --device cuda --json "$OUT/bench_attribution_cuda.json" \
  2>&1 | tee "$OUT/bench_attribution_cuda.txt"
timeout 180 python -m benchmarks.bench_pair_counts --device cuda --json "$OUT/bench_pair_counts_cuda.json" \
  2>&1 | tee "$OUT/bench_pair_counts_cuda.txt"
timeout 120 python -m benchmarks.bench_cka --device cuda --no-peer --json "$OUT/bench_cka_cuda.json" \
  2>&1 | tee "$OUT/bench_cka_cuda.txt"
timeout 150 python -m benchmarks.bench_sweep --device cuda --loop-subsets 12 --vectorised-subsets 12 \
  --reps 3 --json "$OUT/bench_sweep_cuda.json" 2>&1 | tee "$OUT/bench_sweep_cuda.txt"
# Corruptions: CPU-vs-CUDA equality tests, then images/s at 224 px (target 5,000 img/s), batch 64 and 256.
DIVFAST_REQUIRE_CUDA=1 timeout 200 python -m pytest -q tests/test_corruptions.py -k cuda 2>&1 | tail -15 \
  | tee "$OUT/pytest_corruptions_cuda.txt"
for batch in 64 256; do
  timeout 120 python -m benchmarks.bench_corruptions --device cuda --batch $batch \
    --json "$OUT/bench_corruptions_cuda_b$batch.json" 2>&1 | tee "$OUT/bench_corruptions_cuda_b$batch.txt"
done
# Training: one step per loss, 3 x resnet50 at 224 px, batch 64 (bf16 autocast off: fp32 as the CPU run)
timeout 150 python -m benchmarks.bench_training --device cuda --arch resnet50 --image-size 224 \
  --repeats 3 --json "$OUT/bench_training_cuda.json" 2>&1 | tee "$OUT/bench_training_cuda.txt"
echo "gpu_check done"
