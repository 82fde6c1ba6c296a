#!/usr/bin/env bash
# The prepared GPU check: one H100/H200, at most 8 minutes, one summary at the end.
#   bash benchmarks/gpu_check.sh [--out DIR]        (from the repository root, in its venv)
#   GPU_CHECK_MODEL=/path/to/SmolLM2-135M-Instruct bash benchmarks/gpu_check.sh
# Without CUDA it stops at once with exit 2; `--smoke` checks the job sections on a CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export SAFEBASIN_KERNEL_BACKEND="${SAFEBASIN_KERNEL_BACKEND:-auto}"
export TOKENIZERS_PARALLELISM=false
# The whole check stops at 8 minutes; each section has its own, smaller, limit inside.
exec timeout --signal=TERM --kill-after=10 480 "$PY" benchmarks/gpu_check.py "$@"
