"""What `safebasin demo` and `safebasin study` share in this package: the output folder's rule
(a previous run's folder moved aside with --overwrite, anything else refused), the launch
options of their jobs, the --seeds list, and the MLflow parent run under which every stage's
own run is nested.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from safebasin.launcher.config import ConfigError, TrackingArgs

MARKER = "demo_manifest.json"
EXPERIMENT = "safebasin-demo"


def prepare_folder(out: Path, overwrite: bool = False, marker: str | tuple[str, ...] = MARKER,
                   what: str = "demo") -> Path:
    """A fresh output folder. A previous run's folder (it holds one of the `marker` files: the
    demo's, a study's) is moved aside to OUT.replaced-TIME with --overwrite and refused without;
    a folder holding anything else is refused; nothing is ever deleted."""
    markers = (marker,) if isinstance(marker, str) else tuple(marker)
    from safebasin.launcher.outputs import (
        local_store,
        move_aside,
        overlap_problems,
        writable_problem,
    )
    keep = [("the current directory", os.getcwd()), ("the MLflow store", local_store(TrackingArgs().resolved_uri()))]
    problems = overlap_problems("--out", out, [(k, str(v)) for k, v in keep[1:] if v is not None])
    problems += [p for p in [writable_problem("--out", out)] if p]
    if problems:
        raise ConfigError(problems)
    if out.exists() and any(out.iterdir()):
        if not any((out / m).is_file() for m in markers):
            raise ConfigError([f"--out {out} holds files that no safebasin {what} wrote; choose another "
                               f"folder (a previous {what}'s folder, with its {markers[0]}, is moved aside with "
                               f"--overwrite)"])
        if not overwrite:
            raise ConfigError([f"--out {out} holds a previous {what}'s results: pass --overwrite to move them "
                               f"aside to {out.name}.replaced-<time> and start over, or choose another --out"])
        dest = move_aside(out, keep)
        print(f"safebasin {what}: --overwrite: the previous {what} in {out} moved aside to {dest}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def launch_args(nproc: int) -> argparse.Namespace:
    """What run_job reads of the launch options: N ranks on this node, nothing else."""
    return argparse.Namespace(nproc=nproc, launcher="deepspeed", hostfile=None, include=None, exclude=None,
                              nnodes=None, node_rank=None, master_addr=None, master_port=None,
                              rank_logs=None, resume=False, overwrite=False)


class DemoRuns:
    """The parent MLflow run (made with the client, so the stages' own runs can be active in
    this process meanwhile) and the nesting of each stage's run under it."""

    def __init__(self, uri: str, run_name: str, params: dict, experiment: str = EXPERIMENT):
        from mlflow.tracking import MlflowClient
        from safebasin.launcher.config import flatten
        self.uri, self.client = uri, MlflowClient(uri)
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
        self._batch(self.run_id, params=flatten(params))
        self.stage_runs: dict[str, str] = {}

    def _batch(self, run_id: str, *, params: dict | None = None, metrics: dict | None = None) -> None:
        """Params and metrics in batches of MLflow's limit (100 a call): one store transaction a
        batch, where one a value cost ~7 s for a study's ~400 params on a busy SQLite store."""
        import time
        from mlflow.entities import Metric, Param
        now = int(time.time() * 1000)
        items = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()]
        items += [Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()]
        for i in range(0, len(items), 100):
            chunk = items[i:i + 100]
            self.client.log_batch(run_id, metrics=[x for x in chunk if isinstance(x, Metric)],
                                  params=[x for x in chunk if isinstance(x, Param)])

    def adopt(self, stage: str, run_id: str | None, metrics: dict[str, float]) -> None:
        """Nest the stage's run under the demo's (MLflow's parent tag) and log its evaluation."""
        if run_id is None:
            raise RuntimeError(f"stage {stage}: its job made no MLflow run")
        self.stage_runs[stage] = run_id
        self.client.set_tag(run_id, "mlflow.parentRunId", self.run_id)
        self._batch(run_id, metrics={f"eval_{k}": v for k, v in metrics.items()})

    def stage_run(self, name: str) -> str:
        """A run for a stage that is no training job (e.g. the model as shipped); adopt nests it."""
        exp_id = self.client.get_run(self.run_id).info.experiment_id
        run_id = self.client.create_run(exp_id, run_name=name).info.run_id
        self.client.set_terminated(run_id, "FINISHED")
        return run_id

    def record(self, result: dict, results_file: Path, pngs, verdict: str) -> None:
        """The demo's outcome on the parent run: every stage's numbers, the wall time, the
        verdict flag (result[verdict]), the plots and the results file."""
        self.log_metrics({f"{stage}.{m}": v for stage, row in result["stages"].items() for m, v in row.items()
                          if v is not None})
        self.log_metrics({"wall_seconds": result["wall_seconds"], verdict: float(result[verdict])})
        for png in pngs:
            self.log_artifact(Path(png), "plots")
        self.log_artifact(results_file)

    def log_metrics(self, metrics: dict[str, float]) -> None:
        self._batch(self.run_id, metrics=metrics)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


def parse_seeds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError([f"--seeds must be comma-separated integers, e.g. 0,1,2; got {text!r}"]) from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError([f"--seeds needs distinct integers, e.g. 0,1,2; got {text!r}"])
    return seeds
