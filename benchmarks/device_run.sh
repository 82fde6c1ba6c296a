#!/usr/bin/env bash
# The whole GPU check on a lent machine, in one command (from the repository root):
#   bash benchmarks/device_run.sh
# The machine has CUDA torch, triton and transformers but no network: the other packages come
# as wheels in wheels/ (built here by benchmarks/device_wheels.sh, carried with the tree) and
# are installed into .deps without touching its own. Then benchmarks/gpu_check.sh: kernels,
# the tiny jobs, rank binding and benchmarks/gpu_scale.py, all inside 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if compgen -G "wheels/*.whl" > /dev/null; then
  "$PY" -m pip install --quiet --no-deps --no-index --target .deps wheels/*.whl
  export PYTHONPATH="$PWD/.deps${PYTHONPATH:+:$PYTHONPATH}"
fi
# The image sets 9.0a, which DeepSpeed's FusedAdam JIT build cannot parse (RESULTS.md, 2026-11-29).
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export PYTHON="$PY"
exec bash benchmarks/gpu_check.sh --out "${GPU_CHECK_OUT:-$PWD/gpu_check_out}" "$@"
