#!/usr/bin/env bash
# The GPU path in under 5 minutes, on a CUDA machine: the CUDA-marked tests, then the benchmark on the GPU (one
# table: pipeline vs plain loop, the 32x32 step's GFLOP/s vs the GPU's float32 matmul, channels_last, bf16 and
# torch.compile). Run from anywhere in an environment with ganlab installed:  bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=offline WANDB_SILENT=true
python - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device visible (torch.cuda.is_available() is False): nothing to check")
print(f"gpu_check: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
PY
status=0
# 1. the tests that need CUDA (about a minute; torch.compile's first compile is most of it)
timeout 150 python -m pytest -m cuda tests/test_gpu.py -q -p no:cacheprovider || status=$?
# 2. the benchmark on the GPU: steady-state rates, compute rate, GPU-path options (no evaluation rows: the 26k
#    stacked evaluation alone would take most of the budget)
timeout 140 python -m ganlab.bench --quick --options --no-eval || status=$?
exit "$status"
