"""A study from its file to its result: every seed's configs resolved and validated before any job
starts, each seed run in OUT/seed<N>/ (seed.py), and one result over the seeds (mean and sd per
stage and metric, the checks on the means and per seed, plots, results.json, the numbers on the
MLflow parent run). `combine` makes the same result from seed folders run apart.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from safebasin.safety_core.study import local, report
from safebasin.safety_core.study.plan import JOB_COMMANDS, Plan
from safebasin.safety_core.study.resolve import Resolved, resolve
from safebasin.safety_core.study.seed import Context, Jobs, eval_job, run_seed
from safebasin.safety_core.study.spec import StudyError

MARKER = "study.json"
RESULTS = "results.json"


def spec_digest(raw: dict) -> str:
    """What makes two runs one study: the spec but its seed, threads and presentation."""
    kept = {k: v for k, v in raw.items() if k not in ("seed", "threads", "description", "plots", "presets")}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def seed_folder(out: Path, seed: int) -> Path:
    return out / f"seed{seed}"


def prepare(plan: Plan, seeds: list[int], out: Path, jobs: Jobs) -> dict[int, Resolved]:
    """Every seed's configs with references filled in, each validated by its command's schema;
    a StudyError with every problem otherwise. Touches no file."""
    study, resolved, problems = plan.study, {}, []
    for seed in seeds:
        r = resolved[seed] = resolve(plan, seed, seed_folder(out.resolve(), seed))
        for name in plan.order:
            command, cfg = study.stages[name].command, r.stages[name]
            if command in JOB_COMMANDS:
                problems += [f"stages.{name}.config: {p}" for p in jobs.problems(command, cfg)]
            else:
                problems += local.problems(command, cfg, f"stages.{name}.config")
        for suite_name, suite in r.suites.items():
            model, job = eval_job(suite, {"path": "builtin:tiny-llama"})
            problems += [f"evals.{suite_name}: {p}"
                         for p in jobs.problems("eval", {"model": model, **job, "output": {"dir": str(out)}})]
        if problems:
            break  # the same faults again for every other seed
    if problems:
        raise StudyError(list(dict.fromkeys(problems)))
    return resolved


def run(plan: Plan, resolved: dict[int, Resolved], out: Path, jobs: Jobs, runs, *, log=print) -> dict:
    """Every seed's stages not finished before (a resumed folder keeps the finished ones)."""
    t0 = time.perf_counter()
    ctx = Context(plan, jobs, runs, out.resolve() / "evals", log)
    per_seed, seconds, run_ids, plots = {}, {}, {}, {}
    for seed, r in resolved.items():
        log(f"[study {plan.study.name}] seed {seed} ({len(per_seed) + 1} of {len(resolved)})")
        done = run_seed(ctx, r)
        per_seed[seed], seconds[seed], run_ids[seed] = done["stages"], done["seconds"], done["run_ids"]
        plots[seed] = report.training_plots(plan.study, r.root, r.root / "plots")
    return finish(plan, per_seed, seconds, run_ids, out, runs,
                  {"seed_plots": plots, "wall_seconds": time.perf_counter() - t0})


def finish(plan: Plan, per_seed: dict, seconds: dict, run_ids: dict, out: Path, runs, extra: dict) -> dict:
    """results.json over the seeds: mean and sd, the checks on the means and per seed, plots;
    and the outcome on the MLflow parent run."""
    study = plan.study
    agg = report.aggregate(list(per_seed.values()))
    stages = report.means(agg)
    found = report.checks(study, stages)
    result = {"study": study.name, "seeds": list(per_seed), "stages": stages, "aggregate": agg,
              "checks": found, "all_checks_hold": all(c["ok"] for c in found.values()),
              "per_seed": per_seed, "per_seed_checks": {s: report.checks(study, st) for s, st in per_seed.items()},
              "plots": report.bar_plots(study, stages, out / "plots"), "stage_seconds": seconds,
              "mlflow": {"tracking_uri": runs.uri, "experiment": study.tracking.experiment,
                         "parent_run_id": runs.run_id, "stage_run_ids": run_ids}, **extra}
    path = report.write_json(result, out / RESULTS)
    runs.record(result, path, result["plots"].values(), "all_checks_hold")
    return result


def combine(plan: Plan, raw: dict, folders: list[Path], prepare_out, runs_factory) -> dict:
    """One result from study folders run apart (each with the same study but its seeds). Every
    input is read and checked before `prepare_out()` makes the output folder."""
    per_seed, seconds, run_ids, sources, problems = {}, {}, {}, {}, []
    for folder in folders:
        marker, results = folder / MARKER, folder / RESULTS
        if not marker.is_file():
            problems.append(f"{folder}: no {MARKER}: not a study folder")
            continue
        if json.loads(marker.read_text()).get("digest") != spec_digest(raw):
            problems.append(f"{folder}: another study (its {MARKER} holds its spec; pass the same file, preset "
                            f"and overrides)")
        if not results.is_file():
            problems.append(f"{folder}: no {RESULTS}: that study has not finished (continue it with --resume)")
            continue
        done = json.loads(results.read_text())
        for seed, stages in done["per_seed"].items():
            if int(seed) in per_seed:
                problems.append(f"--combine: seed {seed} is in more than one folder ({sources[int(seed)]}, {folder})")
            per_seed[int(seed)], sources[int(seed)] = stages, str(folder.resolve())
            seconds[int(seed)] = done["stage_seconds"].get(seed, {})
            run_ids[int(seed)] = done["mlflow"]["stage_run_ids"].get(seed, {})
    if problems:
        raise StudyError(problems)
    out = prepare_out()
    write_marker(out, raw, sorted(per_seed), {"combined_from": sources})
    runs = runs_factory(out)
    try:
        result = finish(plan, dict(sorted(per_seed.items())), seconds, run_ids, out, runs,
                        {"combined_from": sources, "wall_seconds": max(sum(s.values()) for s in seconds.values())})
    except BaseException:
        runs.end("FAILED")
        raise
    runs.end("FINISHED")
    return result


def write_marker(out: Path, raw: dict, seeds: list[int], extra: dict | None = None) -> None:
    (out / MARKER).write_text(json.dumps({"safebasin_study": 1, "name": raw.get("name"), "seeds": seeds,
                                          "digest": spec_digest(raw), "spec": raw, **(extra or {})},
                                         indent=2, default=str))


def recorded_seeds(out: Path, asked: list[int] | None) -> list[int]:
    """--resume: the seeds the folder was started with (other seeds are refused: they would
    change what its results.json means)."""
    marker = out / MARKER
    if not marker.is_file():
        raise StudyError([f"--resume: {out} holds no {MARKER}: not a study folder"])
    seeds = [int(s) for s in json.loads(marker.read_text())["seeds"]]
    if asked is not None and asked != seeds:
        raise StudyError([f"--resume: {out} was started with --seeds {','.join(map(str, seeds))}; --seeds "
                          f"{','.join(map(str, asked))} would change its layout (resume without --seeds)"])
    return seeds
