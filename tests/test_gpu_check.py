"""The prepared GPU check (benchmarks/gpu_check.sh) as far as a CPU allows: without CUDA it
stops at once with a clear message, and its job sections (train, restore, eval; vLLM skipped
with its reason) run on the tiny model with --smoke."""

import os
import subprocess
import sys

from conftest import REPO


def test_without_cuda_it_stops_cleanly():
    res = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHON": sys.executable}, check=False)
    assert res.returncode == 2 and "no CUDA device is visible" in res.stderr and "--smoke" in res.stderr


def test_job_sections_pass_on_a_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    res = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--smoke", "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=600, env=env, check=False)
    summary = res.stdout[res.stdout.index("==== safebasin GPU check summary"):]
    assert res.returncode == 0, summary
    assert summary.count("PASS") == 3 and "==== 0 failed ====" in summary
    assert "eval.engine=vllm: vllm not installed" in summary
