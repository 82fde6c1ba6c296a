#!/usr/bin/env bash
# The two-rank ZeRO-3 full-parameter training test, N times in a row (default 30): the evidence
# that ranks end cleanly (a teardown abort, exit 134, once failed a CI run after every step had
# finished). Run from the repository root: bash benchmarks/teardown_loop.sh [N]
set -uo pipefail
cd "$(dirname "$0")/.."
n=${1:-30}
export TORCH_SHOW_CPP_STACKTRACES=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
failed=0
for i in $(seq 1 "$n"); do
  if .venv/bin/python -m pytest -q -x -p no:cacheprovider \
       "tests/test_train.py::test_zero3_full_parameter_two_ranks_trains" > /tmp/teardown_loop.$i.log 2>&1; then
    echo "run $i/$n: passed"
  else
    failed=$((failed + 1)); echo "run $i/$n: FAILED (log: /tmp/teardown_loop.$i.log)"
  fi
done
echo "teardown loop: $((n - failed)) of $n passed"
[ "$failed" -eq 0 ]
