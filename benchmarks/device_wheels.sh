#!/usr/bin/env bash
# Build wheels/ for benchmarks/device_run.sh (run here, with network to the package registries):
#   DEVICE_PY=3.12 bash benchmarks/device_wheels.sh
# safebasin itself and the pure-Python packages the GPU image lacked (DeepSpeed, peft, datasets,
# accelerate for the HF Trainer side, pydantic), plus pydantic-core built for the device's
# Python (DEVICE_PY, major.minor: ask the device with `python3 --version` first). Keep it under
# the device tool's 64 MiB carry limit; the script prints the total.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
DEVICE_PY="${DEVICE_PY:?set DEVICE_PY to the device Python version, e.g. 3.12}"
# The versions this checkout's tests pass with (pydantic and pydantic-core must match exactly).
pin() { echo "$1==$("$PY" -c "import importlib.metadata as m; print(m.version('$1'))")"; }
rm -rf wheels && mkdir wheels
"$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w wheels .
"$PY" -m pip wheel --quiet --no-deps -w wheels "$(pin deepspeed)"
"$PY" -m pip download --quiet --no-deps -d wheels "$(pin peft)" "$(pin datasets)" "$(pin accelerate)" \
  "$(pin pydantic)" "$(pin typing-inspection)" "$(pin annotated-types)"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$DEVICE_PY" \
  --platform manylinux2014_x86_64 -d wheels "$(pin pydantic-core)"
du -sh wheels
