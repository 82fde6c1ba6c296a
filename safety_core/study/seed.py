"""One seed of a study, in its own folder: the data written once, the models built once, every
stage in order (a finished one kept, an unfinished one run again from the start, its old folder
moved aside) and each evaluated as soon as it exists, through the answer cache.

Jobs are run through `jobs` (the launcher's run_job, given by the CLI: safety_core never imports
the launcher) and MLflow runs are nested through `runs` (the study's parent run).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from safebasin.safety_core.study import evalcache, local, metrics
from safebasin.safety_core.study.builders import DATA_BUILDERS, MODEL_BUILDERS, write_pool
from safebasin.safety_core.study.plan import JOB_COMMANDS, Plan
from safebasin.safety_core.study.resolve import Resolved
from safebasin.safety_core.study.progress import Progress, digest
from safebasin.safety_core.study.spec import StudyError, merge


class Jobs(Protocol):
    def problems(self, command: str, config: dict) -> list[str]: ...
    def run(self, command: str, config: dict) -> dict: ...  # moves a half-done output.dir aside
    def aside(self, folder: Path) -> Path: ...


class Runs(Protocol):
    uri: str
    def adopt(self, key: str, run_id: str | None, metrics: dict) -> None: ...
    def stage_run(self, name: str) -> str: ...


@dataclass
class Context:
    plan: Plan
    jobs: Jobs
    runs: Runs
    evals_root: Path
    log: Callable[[str], None] = print


def eval_job(suite: dict, model: dict) -> tuple[dict, dict]:
    """(model section, the other sections) of a suite's eval job for one model."""
    section = {**suite["model"], **{k: v for k, v in model.items() if v is not None}}
    job = merge({"eval": suite["eval"], "deepspeed": {"stage": 0}, "tracking": {"enabled": False}}, suite["job"])
    return section, job


def run_seed(ctx: Context, r: Resolved) -> dict:
    """Everything of one seed not finished before; returns {stages: {stage: numbers}, seconds,
    run_ids}."""
    study, root, say = ctx.plan.study, r.root, f"[study {ctx.plan.study.name} seed {r.seed}]"
    progress = Progress(root)
    seconds: dict[str, float] = {}
    _write_data(ctx, r, progress)
    _build_models(ctx, r, progress)
    tokens = {name: rec["token"] for name, rec in progress.stages.items()}

    def identify(path: str) -> str:
        for name, token in tokens.items():
            if path == str(root / name) or path.startswith(str(root / name) + "/"):
                return f"{name}{path[len(str(root / name)):]}@{token}"
        return path

    rows: dict[str, dict] = {}
    for name in ctx.plan.order:
        stage, cfg = ctx.plan.stages[name], r.stages[name]
        want = digest(cfg, root)
        done = progress.stages.get(name)
        if done is not None and done["digest"] != want:
            raise StudyError([f"stage {name} in {root} finished with another config than the study's now; "
                              f"resume with the settings it ran with, or start another --out"])
        if done is None:
            folder = root / name
            t = time.perf_counter()
            if stage.command in JOB_COMMANDS:
                cfg = merge({"tracking": {"experiment": study.tracking.experiment, "uri": ctx.runs.uri,
                                          "run_name": f"{name} seed {r.seed}"}}, cfg)
                run_id = ctx.jobs.run(stage.command, cfg).get("mlflow_run_id")
            else:
                if folder.exists():
                    ctx.log(f"{say} {name}: unfinished before; moved aside to {ctx.jobs.aside(folder)}")
                if stage.command != "model":
                    folder.mkdir(parents=True)
                local.run(stage.command, cfg, folder)
                run_id = None
            if run_id is None:
                run_id = ctx.runs.stage_run(f"{name} seed {r.seed}")
            seconds[name] = time.perf_counter() - t
            tokens[name] = progress.finish(name, want, run_id, seconds[name])
            ctx.log(f"{say} stage {name}: {seconds[name]:.0f} s")
        else:
            ctx.log(f"{say} stage {name}: finished before, kept")
        suites = ctx.plan.suites.get(name, [])
        if suites:
            rows[name] = _evaluate(ctx, r, name, suites, progress, identify)
            ctx.log(f"{say} {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[name].items() if v is not None))
        # Every stage's run is nested under the study's parent run, an evaluated one with its numbers.
        ctx.runs.adopt(f"seed{r.seed}/{name}", progress.stages[name]["run_id"],
                       {k: v for k, v in rows.get(name, {}).items() if v is not None})  # adopt prefixes eval_
    return {"stages": rows, "seconds": {n: rec["seconds"] for n, rec in progress.stages.items()},
            "run_ids": {n: rec["run_id"] for n, rec in progress.stages.items()}}


def _evaluate(ctx: Context, r: Resolved, name: str, suites: list[str], progress: Progress, identify) -> dict:
    out = r.scope["stages"][name]
    row = {}
    for suite_name in suites:
        suite = r.suites[suite_name]
        model, job = eval_job(suite, {"path": out["model"], "adapter": out.get("adapter")})
        key = evalcache.key(model, job, identify)
        entry = progress.evals.get(f"{name}/{suite_name}")
        if entry is None or entry["key"] != key:
            folder = evalcache.folder(ctx.evals_root, key)
            summary = evalcache.cached(folder)
            if summary is None:
                summary = ctx.jobs.run("eval", {"model": model, **job, "output": {"dir": str(folder)}})
            else:
                ctx.log(f"[study] {name} / {suite_name}: answers of this model to these prompts exist ({folder})")
            entry = {"key": key, "numbers": metrics.numbers(summary, suite["eval"], suite["metrics"])}
            progress.evals[f"{name}/{suite_name}"] = entry
            progress.save()
        row.update(entry["numbers"])
    return row


def _write_data(ctx: Context, r: Resolved, progress: Progress) -> None:
    want = digest(r.data, r.root)
    if progress.data.get("digest") == want:
        return
    if progress.data:
        raise StudyError([f"data of {r.root} was written from another data spec than the study's now; resume "
                          f"with the settings it ran with, or start another --out"])
    folder = r.root / "data"
    if folder.exists():
        ctx.jobs.aside(folder)
    for name, (builder, args) in r.data["builders"].items():
        DATA_BUILDERS[builder].write(folder, **args)
    for name, pool in r.data["pools"].items():
        write_pool(name, pool["source"], pool["splits"], int(pool["seed"]), pool["shuffle"], folder)
    progress.data = {"digest": want}
    progress.save()


def _build_models(ctx: Context, r: Resolved, progress: Progress) -> None:
    for name, model in r.models.items():
        if isinstance(model, str):
            continue
        want = digest(list(model), r.root)
        if progress.models.get(name) == want:
            continue
        if name in progress.models:
            raise StudyError([f"models.{name} of {r.root} was built from another spec than the study's now"])
        folder = r.root / "models" / name
        if folder.exists():
            ctx.jobs.aside(folder)
        builder, args = model
        MODEL_BUILDERS[builder](folder, **args)
        progress.models[name] = want
        progress.save()
