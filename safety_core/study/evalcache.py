"""Answers are generated once per model and prompt set: an evaluation's key is the identity of
the model evaluated, the content of every prompt file it reads and every generation, judge and
task setting, and its folder EVALS/<key>/ holds the eval job's outputs. A second suite, stage
or seed asking for the same key reads that folder instead of generating again. Imports only
progress.NOT_COMPUTED (the sections that change how a job runs, not what it computes).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safebasin.safety_core.study.progress import NOT_COMPUTED

RESULTS = "results.json"


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _content(value: Any) -> Any:
    """A data source by what it holds: a local file's path is replaced by its content digest, so
    two seeds' identical prompt files share a key and an edited file does not."""
    if isinstance(value, dict):
        out = {k: _content(v) for k, v in value.items()}
        path = value.get("path")
        if isinstance(path, str) and Path(path).is_file():
            out["path"] = "sha256:" + file_digest(Path(path))
        return out
    if isinstance(value, list):
        return [_content(v) for v in value]
    return value


def key(model: dict, job: dict, identify: Callable[[str], str]) -> str:
    """The key of evaluating `model` (a model section) with `job` (the eval job's sections but
    model and output). `identify(path)` names a model or adapter folder: a stage's output by
    the stage's finishing token (a stage run again is another model), anything else as written."""
    who = {k: (identify(v) if k in ("path", "adapter") and isinstance(v, str) else v) for k, v in model.items()}
    # how the job runs (threads, tracking) is not what it answers: a resume may change it
    computed = {k: v for k, v in job.items() if k not in NOT_COMPUTED}
    text = json.dumps({"model": who, "job": _content(computed)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def folder(root: Path, cache_key: str) -> Path:
    return root / cache_key


def cached(path: Path) -> dict | None:
    """The summary of a finished evaluation in `path`, or None."""
    results = path / RESULTS
    return json.loads(results.read_text()) if results.is_file() else None
