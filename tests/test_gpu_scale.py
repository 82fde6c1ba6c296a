"""benchmarks/gpu_scale.py as far as a CPU allows: --smoke runs every section (8B-shape LoRA
sides, 1B-shape full ZeRO-3, restoration, eval, the penalty kernel) at toy sizes, each side in
its own process; and its cost model counts what the architectures really hold."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_scale  # noqa: E402


@pytest.mark.parametrize("name", ["smollm2-135m", "llama-3.2-1b", "llama-3.1-8b"])
def test_linear_parameters_are_the_models_matmul_weights(name):
    from safebasin.safety_core.train.architectures import arch_config
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = arch_config(name)
    config = AutoConfig.for_model("llama", **{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert gpu_scale.linear_params(cfg) == linear


def test_penalty_bytes_count_two_passes_over_the_masters():
    b = gpu_scale.penalty_bytes(4096, 4096, 64)
    n = 4096 * 4096
    assert b["value"] == 8 * n + 4096 * 64 * 4
    assert b["gradient"] - b["value"] == 4 * n + 2 * 64 * 4096 * 4  # dW written, M and the partials


@pytest.mark.multiproc
def test_smoke_runs_every_section(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_scale.py"), "--smoke", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, env=env, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads((tmp_path / "scale.json").read_text())["results"]
    for name in ("lora_safebasin_ckpt", "lora_anchored_k16_ckpt", "lora_plain_ckpt", "lora_hf_ckpt", "full_z3_anchored"):
        (rec,) = out[name]
        assert rec["exit"] == 0 and rec["tokens_per_s"] > 0 and rec["rss_peak"] > 0, (name, rec)
    (restore,) = out["restore_lora"]
    assert restore["seconds_per_iteration"] > 0 and restore["history_printed_gib"] > 0
    assert out["eval_hf"][0]["prompts_per_s_whole_process"] > 0
    (kernel,) = out["kernel"]
    assert kernel["seconds"] > 0 and kernel["bytes"] == gpu_scale.penalty_bytes(96, 64, 16)["step"]
    assert "| lora_safebasin_ckpt | 1/1 |" in res.stdout


def test_kernel_section_times_every_triton_setting_under_the_interpreter(tmp_path):
    """The GPU-only part of the kernel section (the Triton passes at each dot precision, checked
    against the default) runs on the CPU under TRITON_INTERPRET=1 with the triton backend forced."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1", "SAFEBASIN_KERNEL_BACKEND": "triton"}
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_scale.py"), "--smoke", "--sections", "kernel",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, env=env, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (row,) = json.loads((tmp_path / "scale.json").read_text())["results"]["kernel"]
    names = set(row["others"])
    assert {"torch reference", "triton passes ieee 32x64/512", "triton passes tf32x3 32x64/512"} <= names
    for name in names - {"torch reference"}:
        assert row["others"][name]["max_rel_diff_of_T_from_default"] < 1e-5
    # A second call with the same --out adds to the first's figures (here: restore without a lora run).
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_scale.py"), "--smoke", "--sections", "restore",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, env=env, check=False)
    saved = json.loads((tmp_path / "scale.json").read_text())
    assert res.returncode == 0 and saved["results"]["kernel"] == [row]
    assert any("no adapter from the lora section" in n for n in saved["notes"])
