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

from safebasin.safety_core.study import local, report, sweep
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
            command, cfg = plan.stages[name].command, r.stages[name]
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
    per_seed, seconds, run_ids, plots, scapes = {}, {}, {}, {}, {}
    for seed, r in resolved.items():
        log(f"[study {plan.study.name}] seed {seed} ({len(per_seed) + 1} of {len(resolved)})")
        done = run_seed(ctx, r)
        per_seed[seed], seconds[seed], run_ids[seed] = done["stages"], done["seconds"], done["run_ids"]
        plots[seed] = report.training_plots(plan.study, r.root, r.root / "plots")
        scapes[seed] = report.landscapes(plan.study, r.root)
    return finish(plan, per_seed, seconds, run_ids, out, runs,
                  {"seed_plots": plots, "landscapes": scapes, "wall_seconds": time.perf_counter() - t0})


def finish(plan: Plan, per_seed: dict, seconds: dict, run_ids: dict, out: Path, runs, extra: dict) -> dict:
    """results.json over the seeds: mean and sd, the checks on the means and per seed, the
    verdicts, the sweeps (their points apart from the stage table), plots; and the outcome on
    the MLflow parent run."""
    study = plan.study
    points = {s: {n: row for n, row in rows.items() if n in plan.points} for s, rows in per_seed.items()}
    per_seed = {s: {n: row for n, row in rows.items() if n not in plan.points} for s, rows in per_seed.items()}
    agg = report.aggregate(list(per_seed.values()))
    stages = report.means(agg)
    found = report.checks(study, stages)
    first = next(iter(per_seed))
    result = {"study": study.name, "seeds": list(per_seed), "stages": stages, "aggregate": agg,
              "checks": found, "all_checks_hold": report.all_hold(found),
              "verdicts": {name: report.verdict(v, stages) for name, v in study.verdicts.items()},
              "caption": resolve(plan, first, seed_folder(out.resolve(), first)).caption,
              "per_seed": per_seed, "per_seed_checks": {s: report.checks(study, st) for s, st in per_seed.items()},
              "per_seed_points": points, "sweeps": sweeps(plan, points, out / "plots"),
              "plots": report.bar_plots(study, stages, out / "plots"), "stage_seconds": seconds,
              "mlflow": {"tracking_uri": runs.uri, "experiment": study.tracking.experiment,
                         "parent_run_id": runs.run_id, "stage_run_ids": run_ids}, **extra}
    path = report.write_json(result, out / RESULTS)
    pngs = [*result["plots"].values(), *(s["files"]["png"] for s in result["sweeps"].values() if "png" in s["files"]),
            *(scape["png"] for seed in (extra.get("landscapes") or {}).values() for scape in seed.values()
              if scape.get("png"))]
    runs.record(result, path, pngs, "all_checks_hold")
    return result


def sweeps(plan: Plan, points: dict[int, dict], out_dir: Path) -> dict:
    """Each enabled sweep's rows per seed and as means over seeds, FILE.csv / FILE.png of the
    means under out_dir, and the pairs of points at matched accuracy."""
    found = {}
    for name, sw in plan.study.sweeps.items():
        mine = {n: p for n, p in plan.points.items() if p.sweep == name}
        if not mine:
            continue
        per_seed = {seed: sweep.rows(sw, mine, rows) for seed, rows in points.items()}
        if not any(per_seed.values()):
            continue  # enabled but none of its points ran (e.g. another sweep's --stages)
        table = sweep.mean_rows(sw, list(per_seed.values()))
        pairs = sweep.matched(sw, list(per_seed.values()))
        found[name] = {"points": table, "per_seed": per_seed, "files": sweep.write(sw, name, table, out_dir),
                       "matched": pairs, "verdict": sweep.verdict(sw, table, pairs)}
    return found


def combine(plan: Plan, raw: dict, folders: list[Path], prepare_out, runs_factory) -> dict:
    """One result from study folders run apart (each with the same study but its seeds). Every
    input is read and checked before `prepare_out()` makes the output folder."""
    per_seed, seconds, run_ids, sources, scapes, problems = {}, {}, {}, {}, {}, []
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
            # a sweep's points are kept apart from the stage table; they join it again here
            per_seed[int(seed)] = {**stages, **(done.get("per_seed_points") or {}).get(seed, {})}
            sources[int(seed)] = str(folder.resolve())
            scapes[int(seed)] = (done.get("landscapes") or {}).get(seed, {})
            seconds[int(seed)] = done["stage_seconds"].get(seed, {})
            run_ids[int(seed)] = done["mlflow"]["stage_run_ids"].get(seed, {})
    if problems:
        raise StudyError(problems)
    out = prepare_out()
    write_marker(out, raw, sorted(per_seed), {"combined_from": sources})
    runs = runs_factory(out)
    try:
        result = finish(plan, dict(sorted(per_seed.items())), seconds, run_ids, out, runs,
                        {"combined_from": sources, "landscapes": scapes,
                         "wall_seconds": max(sum(s.values()) for s in seconds.values())})
    except BaseException:
        runs.end("FAILED")
        raise
    runs.end("FINISHED")
    return result


def write_marker(out: Path, raw: dict, seeds: list[int], extra: dict | None = None) -> None:
    (out / MARKER).write_text(json.dumps({"safebasin_study": 1, "name": raw.get("name"), "seeds": seeds,
                                          "digest": spec_digest(raw), "spec": raw, **(extra or {})},
                                         indent=2, default=str))


def resumed_marker(out: Path, raw: dict) -> None:
    """--resume with another spec (a stage kept only where its config is unchanged): the marker
    takes the spec the folder's results now come from, and keeps the digests it had before, so
    that --combine joins it with folders of the same spec."""
    marker = json.loads((out / MARKER).read_text())
    if marker.get("digest") == spec_digest(raw):
        return
    before = [*marker.get("earlier_digests", []), marker.get("digest")]
    extra = {k: v for k, v in marker.items() if k not in ("safebasin_study", "name", "seeds", "digest", "spec")}
    write_marker(out, raw, marker["seeds"], {**extra, "earlier_digests": before})


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
