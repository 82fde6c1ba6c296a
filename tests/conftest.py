"""Shared fixtures: a tiny model built locally once per session, isolated caches and MLflow."""

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# ../shared/data beside the clone, or where SAFEBASIN_SHARED_DATA points (a clone elsewhere).
SHARED_DATA = next((p for p in (Path(os.environ.get("SAFEBASIN_SHARED_DATA", REPO.parent / "shared" / "data")),)
                    if p.exists()), None)

# Every test process (and the ranks it starts) runs DeepSpeed on the CPU accelerator.
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("safebasin-cache")
    os.environ["SAFEBASIN_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_model_dir(session_cache) -> Path:
    from safebasin.safety_core.train.tiny import resolve_builtin_model
    return Path(resolve_builtin_model("builtin:tiny-llama"))


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture
def shared_data() -> Path:
    if SHARED_DATA is None:
        pytest.skip("../shared/data is not present on this machine")
    return SHARED_DATA


def safebasin_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 500):
    """Run the console script as a user would; returns the CompletedProcess. On timeout the
    whole process group goes (the ranks too, not just the launcher), so a stuck job cannot
    hold ports, files or CPU for the tests after it; the timeout stays below pytest's."""
    import signal
    import subprocess
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "safebasin.launcher.cli", *args], cwd=cwd, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except BaseException:  # the timeout, or pytest's own interrupt: never leave the ranks running
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture(scope="session")
def aligned_pair(tmp_path_factory, session_cache) -> tuple[Path, Path]:
    """(base, aligned): a tiny Llama whose MLP has an odd row count (175), so that ZeRO-3
    partitions of its 2-D weights start mid-row on 2 ranks, and a perturbed copy of it standing
    in for the aligned model (every weight moved by a seeded Gaussian, scale 0.02)."""
    import torch
    from safebasin.safety_core.train.tiny import build_tiny_model
    from transformers import AutoModelForCausalLM
    root = tmp_path_factory.mktemp("aligned-pair")
    base = build_tiny_model(root / "base", intermediate_size=175)
    model = AutoModelForCausalLM.from_pretrained(base)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(root / "aligned")
    return base, root / "aligned"
