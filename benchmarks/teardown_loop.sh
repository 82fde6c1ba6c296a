#!/usr/bin/env bash
# The two-rank ZeRO-3 full-parameter training test, N times in a row (default 30): the evidence
# that ranks end cleanly (a teardown abort, exit 134, once failed a CI run after every step had
# finished). A run counts as failed when the test fails or when its ranks' output shows a
# teardown error (terminate called, Aborted, exit 134 / SIGABRT), even in a passing run: the
# ranks run with TORCH_SHOW_CPP_STACKTRACES=1 and the test prints their output (pytest -rP).
# Run from anywhere: bash benchmarks/teardown_loop.sh [N]   (LOGS=DIR keeps the logs there)
set -uo pipefail
cd "$(dirname "$0")/.."
n=${1:-30}
logs=${LOGS:-$(mktemp -d /tmp/teardown_loop.XXXXXX)}
mkdir -p "$logs"
export TORCH_SHOW_CPP_STACKTRACES=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
# What a rank that aborts in C++ teardown leaves in the output: libstdc++'s message, the shell's
# or launcher's report of SIGABRT (exit 134, return code -6), a core dump.
teardown='terminate called|Aborted|exit 134|exit code 134|return code = -6|return code = 134|core dumped'
test_id="tests/test_train.py::test_zero3_full_parameter_two_ranks_trains"
failed=0
for i in $(seq 1 "$n"); do
  log="$logs/run$i.log"
  start=$SECONDS
  .venv/bin/python -m pytest -q -rP -x -p no:cacheprovider "$test_id" > "$log" 2>&1
  code=$?
  found=$(grep -E -c "$teardown" "$log")
  if [ "$code" -eq 0 ] && [ "$found" -eq 0 ]; then
    echo "run $i/$n: passed ($((SECONDS - start)) s)"
  else
    failed=$((failed + 1))
    echo "run $i/$n: FAILED (pytest exit $code, $found teardown error lines; log: $log)"
    grep -E -m 5 "$teardown" "$log" | sed 's/^/    /'
  fi
done
echo "teardown loop: $((n - failed)) of $n passed, $failed failed (logs in $logs)"
[ "$failed" -eq 0 ]
