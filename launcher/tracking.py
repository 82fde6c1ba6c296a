"""MLflow tracking: one run per job, opened by global rank 0 only, reattached on resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

RUN_FILE = "mlflow_run.json"


class Tracker:
    """Rank 0 gets a live MLflow run; other ranks get an inert tracker so callers never branch."""

    def __init__(self, config, out_dir: str | Path, *, active: bool, parent_run_id: str | None = None,
                 default_run_name: str | None = None, reattach: bool = False):
        """`default_run_name` names the run when tracking.run_name is not set; `reattach`: a
        resumed job continues the run its output folder records."""
        self.active = active and config.tracking.enabled
        self.out_dir = Path(out_dir)
        self.run_id: str | None = None
        if not self.active:
            return
        import mlflow
        self._mlflow = mlflow
        mlflow.set_tracking_uri(config.tracking.resolved_uri())
        mlflow.set_experiment(config.tracking.experiment)
        run_file = self.out_dir / RUN_FILE
        # Only a resumed job continues the folder's run: any other job gets a run of its own, so
        # two jobs' metrics never mix in one run.
        previous = self._previous_run(run_file) if reattach else None
        if previous is not None:
            self.run_id = previous
            mlflow.start_run(run_id=self.run_id)
            return
        from safebasin.launcher.config import flatten
        run = mlflow.start_run(run_name=config.tracking.run_name or default_run_name,
                               nested=parent_run_id is not None, parent_run_id=parent_run_id)
        self.run_id = run.info.run_id
        params = {k: ("" if v is None else str(v))[:6000]
                  for k, v in flatten(config.model_dump(mode="json", by_alias=True)).items()}
        items = list(params.items())
        for i in range(0, len(items), 100):  # MLflow caps a params batch at 100 entries
            mlflow.log_params(dict(items[i:i + 100]))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        run_file.write_text(json.dumps({"run_id": self.run_id, "tracking_uri": mlflow.get_tracking_uri(),
                                        "experiment": config.tracking.experiment}))

    def _previous_run(self, run_file: Path) -> str | None:
        """The run this output folder's job logged to, when it is in the current store: a
        resumed job continues it. One recorded in another store (the URI changed, or
        the database was removed) cannot be reattached; the job then gets a new run."""
        if not run_file.exists():
            return None
        from mlflow.exceptions import MlflowException
        recorded = json.loads(run_file.read_text())
        current = self._mlflow.get_tracking_uri()
        if recorded.get("tracking_uri") == current:
            try:
                self._mlflow.get_run(recorded["run_id"])
                return recorded["run_id"]
            except MlflowException:
                pass  # reported below
        print(f"[safebasin] MLflow run {recorded['run_id']} recorded in {run_file} is not in the store "
              f"{current}; starting a new run")
        return None

    def log_metrics(self, row: dict, step: int | None = None) -> None:
        if not self.active:
            return
        clean = {k: float(v) for k, v in row.items()
                 if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
                 and math.isfinite(float(v))}
        if clean:
            self._mlflow.log_metrics(clean, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.active and Path(path).exists():
            if Path(path).is_dir():
                self._mlflow.log_artifacts(str(path), artifact_path)
            else:
                self._mlflow.log_artifact(str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        if self.active:
            self._mlflow.end_run(status=status)
            self.active = False
