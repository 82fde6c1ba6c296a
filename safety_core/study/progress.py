"""What a seed folder has finished, written after every step (atomically) and read by --resume:
the data and built models (with the digest of the spec that made them), each finished stage
(its config digest, a token naming this finished output, its MLflow run, its seconds) and each
evaluation (its cache key and numbers). A stage is kept on resume only if its config is the one
it finished with; an unfinished stage is run again from the start. Imports nothing of the project.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

FILE = "progress.json"
# Keys that change how a job runs, not what it computes: a resume may change them.
NOT_COMPUTED = ("tracking", "runtime")


def digest(value, root: Path) -> str:
    """A config's digest, independent of where the study folder lies and of NOT_COMPUTED keys."""
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if k not in NOT_COMPUTED}
    text = json.dumps(value, sort_keys=True, default=str).replace(str(root), "@SEED")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Progress:
    def __init__(self, root: Path):
        self.path = root / FILE
        saved = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.data: dict = saved.get("data", {})
        self.models: dict = saved.get("models", {})
        self.stages: dict[str, dict] = saved.get("stages", {})
        self.evals: dict[str, dict] = saved.get("evals", {})

    def finish(self, stage: str, config_digest: str, run_id: str | None, seconds: float) -> str:
        token = uuid.uuid4().hex
        self.stages[stage] = {"digest": config_digest, "token": token, "run_id": run_id, "seconds": seconds}
        self.save()
        return token

    def forget(self, stage: str) -> None:
        self.stages.pop(stage, None)
        for k in [k for k in self.evals if k.startswith(f"{stage}/")]:
            self.evals.pop(k)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"data": self.data, "models": self.models, "stages": self.stages,
                                   "evals": self.evals}, indent=2))
        os.replace(tmp, self.path)
