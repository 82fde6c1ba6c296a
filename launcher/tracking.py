"""MLflow tracking: one run per job, opened by global rank 0 only, reattached on resume.

Everything MLflow does happens on one background thread, off the training step's critical
path: opening the store and the run (seconds for a fresh SQLite store) overlaps model loading,
and metrics are queued and written in batches (one `log_batch` per drain, not one SQLite
transaction per metric per step). `end()` drains the queue before it closes the run, so no
row is lost; an error in the thread is raised there (or when `run_id` is read), never dropped.
"""

from __future__ import annotations

import json
import math
import queue
import sys
import threading
import time
from pathlib import Path

RUN_FILE = "mlflow_run.json"
# How long the writer waits for more rows before writing what it has: at most one batch per
# interval, so a fast loop costs one SQLite transaction per interval, not per step.
BATCH_INTERVAL_S = 0.5
MAX_BATCH = 1000  # MLflow caps a log_batch at 1000 metrics


class Tracker:
    """Rank 0 gets a live MLflow run; other ranks get an inert tracker so callers never branch."""

    def __init__(self, config, out_dir: str | Path, *, active: bool, parent_run_id: str | None = None,
                 default_run_name: str | None = None, reattach: bool = False):
        """`default_run_name` names the run when tracking.run_name is not set; `reattach`: a
        resumed job continues the run its output folder records."""
        self.active = active and config.tracking.enabled
        self.out_dir = Path(out_dir)
        self._run_id: str | None = None
        self._ready: threading.Event | None = None
        self._error: BaseException | None = None
        if not self.active:
            return
        self._ready = threading.Event()
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, args=(config, parent_run_id, default_run_name, reattach),
                                        name="safebasin-mlflow", daemon=True)
        self._thread.start()

    # -- the caller's side ------------------------------------------------------------------

    @property
    def run_id(self) -> str | None:
        if self._ready is None:
            return None
        self._ready.wait()
        self._raise_error()
        return self._run_id

    def log_metrics(self, row: dict, step: int | None = None) -> None:
        if not self.active:
            return
        clean = {k: float(v) for k, v in row.items()
                 if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
                 and math.isfinite(float(v))}
        if clean:
            self._queue.put(("metrics", clean, step, int(time.time() * 1000)))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.active and Path(path).exists():
            self._queue.put(("artifact", str(path), artifact_path, None))

    def flush(self) -> None:
        """Wait until everything queued so far is written."""
        if self.active:
            done = threading.Event()
            self._queue.put(("flush", done, None, None))
            while not done.wait(0.1):
                if not self._thread.is_alive():
                    break
            self._raise_error()

    def end(self, status: str = "FINISHED") -> None:
        if not self.active:
            return
        self._queue.put(("end", status, None, None))
        self._thread.join()
        self.active = False
        if status == "FINISHED":
            self._raise_error()
        elif self._error is not None:
            # The job already failed: its own error is the one to raise, this one is reported.
            print(f"[safebasin] MLflow tracking also failed: {self._error}", file=sys.stderr)

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"MLflow tracking failed: {error}") from error

    # -- the writer thread ------------------------------------------------------------------

    def _work(self, config, parent_run_id: str | None, default_run_name: str | None, reattach: bool) -> None:
        try:
            self._open(config, parent_run_id, default_run_name, reattach)
        except BaseException as e:  # handed to the caller at run_id / end()
            self._error = e
            self._ready.set()
            self._drain_after_error()
            return
        self._ready.set()
        while True:
            items = [self._queue.get()]
            deadline = time.monotonic() + BATCH_INTERVAL_S
            # Gather what arrives within the interval, unless someone waits on a flush or end.
            while items[-1][0] == "metrics":
                try:
                    items.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            try:
                finished = self._write(items)
            except BaseException as e:
                self._error = e
                self._drain_after_error()
                return
            if finished:
                return

    def _drain_after_error(self) -> None:
        """Keep answering flush/end so the caller never waits forever on a dead writer."""
        while True:
            kind, value, _, _ = self._queue.get()
            if kind == "flush":
                value.set()
            elif kind == "end":
                return

    def _write(self, items: list) -> bool:
        from mlflow.entities import Metric
        metrics = [Metric(k, v, ts, step or 0) for kind, row, step, ts in items if kind == "metrics"
                   for k, v in row.items()]
        for i in range(0, len(metrics), MAX_BATCH):
            self._client.log_batch(self._run_id, metrics=metrics[i:i + MAX_BATCH])
        for kind, value, extra, _ in items:
            if kind == "artifact":
                if Path(value).is_dir():
                    self._client.log_artifacts(self._run_id, value, extra)
                else:
                    self._client.log_artifact(self._run_id, value, extra)
            elif kind == "flush":
                value.set()
            elif kind == "end":
                self._client.set_terminated(self._run_id, status=value)
                return True
        return False

    def _open(self, config, parent_run_id: str | None, default_run_name: str | None, reattach: bool) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient
        mlflow.set_tracking_uri(config.tracking.resolved_uri())
        self._client = client = MlflowClient()
        experiment = mlflow.set_experiment(config.tracking.experiment)
        run_file = self.out_dir / RUN_FILE
        # Only a resumed job continues the folder's run: any other job gets a run of its own, so
        # two jobs' metrics never mix in one run.
        previous = self._previous_run(run_file, client) if reattach else None
        if previous is not None:
            self._run_id = previous
            client.update_run(previous, status="RUNNING")
            return
        from mlflow.entities import Param
        from safebasin.launcher.config import flatten
        tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else {}
        run = client.create_run(experiment.experiment_id, run_name=config.tracking.run_name or default_run_name,
                                 tags=tags)
        self._run_id = run.info.run_id
        params = [Param(k, ("" if v is None else str(v))[:6000])
                  for k, v in flatten(config.model_dump(mode="json", by_alias=True)).items()]
        for i in range(0, len(params), 100):  # MLflow caps a params batch at 100 entries
            client.log_batch(self._run_id, params=params[i:i + 100])
        self.out_dir.mkdir(parents=True, exist_ok=True)
        run_file.write_text(json.dumps({"run_id": self._run_id, "tracking_uri": mlflow.get_tracking_uri(),
                                        "experiment": config.tracking.experiment}))

    @staticmethod
    def _previous_run(run_file: Path, client) -> str | None:
        """The run this output folder's job logged to, when it is in the current store: a
        resumed job continues it. One recorded in another store (the URI changed, or
        the database was removed) cannot be reattached; the job then gets a new run."""
        if not run_file.exists():
            return None
        import mlflow
        from mlflow.exceptions import MlflowException
        recorded = json.loads(run_file.read_text())
        current = mlflow.get_tracking_uri()
        if recorded.get("tracking_uri") == current:
            try:
                client.get_run(recorded["run_id"])
                return recorded["run_id"]
            except MlflowException:
                pass  # reported below
        print(f"[safebasin] MLflow run {recorded['run_id']} recorded in {run_file} is not in the store "
              f"{current}; starting a new run")
        return None
