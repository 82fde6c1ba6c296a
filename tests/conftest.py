"""Shared fixtures: a tiny model built locally once per session, isolated caches and MLflow."""

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = next((p for p in (REPO.parent / "shared" / "data", Path("/work/shared/data")) if p.exists()), None)

# Every test process (and the ranks it starts) runs DeepSpeed on the CPU accelerator.
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("safebasin-cache")
    os.environ["SAFEBASIN_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_model_dir(session_cache) -> Path:
    from safebasin.safety_core.tiny import resolve_builtin_model
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


def safebasin_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600):
    """Run the console script as a user would; returns the CompletedProcess."""
    import subprocess
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "safebasin.launcher.cli", *args], cwd=cwd,
                          env=full_env, capture_output=True, text=True, timeout=timeout)
