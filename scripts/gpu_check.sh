#!/usr/bin/env bash
# The GPU path in about 5 minutes (on an H200: 186 s and 219 s with --quick evaluations; 186 s with the full ones on
# 2026-11-30, before the ~40 s determinism test, the deterministic resume test (three short CLI runs) and the
# deterministic host-sync case joined the CUDA tests; each part has its own limit, 200 + 130 + 120 s
# at most), on a CUDA machine: the CUDA-marked tests, then the benchmark on the GPU (one
# table: pipeline vs plain loop, the 32x32 step's GFLOP/s vs the GPU's float32 matmul, channels_last, bf16 and
# torch.compile), then one evaluation per built-in data set on the GPU at its protocol's sample count
# (stacked_digits: 26,000).
# Run from anywhere in an environment with ganlab installed:  bash scripts/gpu_check.sh
# (PYTHON=... picks the interpreter; default: python, else python3)
set -uo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=offline WANDB_SILENT=true PYTHONUNBUFFERED=1
PY=${PYTHON:-$(command -v python || command -v python3)}
"$PY" - <<'PY' || exit 1
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device visible (torch.cuda.is_available() is False): nothing to check")
print(f"gpu_check: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
PY
status=0
start=$SECONDS
step() {  # step NAME SECONDS CMD...: run one part under its time limit, remember a failure, go on
    local name=$1 limit=$2 t0=$SECONDS rc=0
    shift 2
    echo "== gpu_check: $name (limit ${limit} s)"
    timeout "$limit" "$@" || rc=$?
    echo "== gpu_check: $name: exit $rc after $((SECONDS - t0)) s"
    [ "$rc" -eq 0 ] || status=$rc
}
# 1. the tests that need CUDA (torch.compile's first compile is most of it)
step "CUDA tests" 200 "$PY" -m pytest -m cuda tests/test_gpu.py -q -p no:cacheprovider
# 2. the benchmark on the GPU: steady-state rates, compute rate, GPU-path options
step "benchmark" 130 "$PY" -m ganlab.bench --quick --options --no-eval
# 3. evaluation on the GPU: one evaluation's seconds and its share of a default run, per built-in data set
step "evaluation" 120 "$PY" -m ganlab.bench --settings none
echo "== gpu_check: done in $((SECONDS - start)) s, exit $status"
exit "$status"
