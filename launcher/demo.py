"""`safebasin demo`: the model-organism demo, from nothing to the table, offline and seeded.

Each stage is an ordinary job (the configs safety_core.demo.organism writes) started through
`run_job`, so `--nproc N` runs the training, restoration and evaluation stages on N ranks with
the same launch machinery as `safebasin train`; the basis extraction, the landscapes and the
report run in this process. MLflow: one parent run for the demo, and each stage's own run (the
training or restoration job's) nested under it and given the stage's evaluation metrics.

(Over 300 lines: one seed, several seeds and the lambda frontier share the stage runner and the
MLflow parent run defined here; the organism itself lives in safety_core/demo/.)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

from safebasin.launcher.config import ConfigError, TrackingArgs, apply_overrides, build

MARKER = "demo_manifest.json"
EXPERIMENT = "safebasin-demo"


def load_settings(quick: bool, overrides: list[str]):
    from safebasin.safety_core.demo.settings import QUICK, DemoSettings, merge
    raw = DemoSettings().model_dump(mode="json", by_alias=True)
    if quick:
        raw = merge(raw, QUICK)
    return build(apply_overrides(raw, list(overrides)), schema=DemoSettings)


def prepare_folder(out: Path, overwrite: bool = False, marker: str = MARKER, what: str = "demo") -> Path:
    """A fresh output folder. A previous demo's folder (it holds the demo's marker file; a study's:
    `marker`) is moved aside to OUT.replaced-TIME with --overwrite and refused without; a folder
    holding anything else is refused; nothing is ever deleted."""
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
        if not (out / marker).is_file():
            raise ConfigError([f"--out {out} holds files that no safebasin {what} wrote; choose another "
                               f"folder (a previous {what}'s folder, with its {marker}, is moved aside with "
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
        for k, v in flatten(params).items():
            self.client.log_param(self.run_id, k, str(v)[:6000])
        self.stage_runs: dict[str, str] = {}

    def adopt(self, stage: str, run_id: str | None, metrics: dict[str, float]) -> None:
        """Nest the stage's run under the demo's (MLflow's parent tag) and log its evaluation."""
        if run_id is None:
            raise RuntimeError(f"stage {stage}: its job made no MLflow run")
        self.stage_runs[stage] = run_id
        self.client.set_tag(run_id, "mlflow.parentRunId", self.run_id)
        for k, v in metrics.items():
            self.client.log_metric(run_id, f"eval_{k}", v)

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
        for k, v in metrics.items():
            self.client.log_metric(self.run_id, k, v)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


def run_demo(settings, out: Path, nproc: int, *, frontier: bool = False, log=print) -> dict:
    import torch
    from safebasin.launcher.jobs import run_job
    from safebasin.safety_core.anchor.basis import extract_basis
    from safebasin.safety_core.demo import frontier as frontier_mod
    from safebasin.safety_core.demo import landscapes, organism, report
    from safebasin.safety_core.measure.evaluation import flat_metrics

    t_start = time.perf_counter()
    torch.set_num_threads(settings.threads)
    layout = organism.Layout(out.resolve())
    (out / MARKER).write_text(json.dumps({"safebasin_demo": 1, "settings": settings.model_dump(by_alias=True)},
                                         indent=2))
    uri = TrackingArgs().resolved_uri()
    tracking = {"experiment": EXPERIMENT, "uri": uri}
    runs = DemoRuns(uri, f"demo {out.name}", settings.model_dump(mode="json", by_alias=True))
    args = launch_args(nproc)
    seconds: dict[str, float] = {}
    stages: dict[str, dict] = {}

    @contextmanager
    def timed(name: str):
        t = time.perf_counter()
        yield
        seconds[name] = time.perf_counter() - t

    def job(command: str, raw: dict) -> dict:
        return run_job(command, build(raw), args)

    def evaluate(name: str, run_id: str | None, into: dict | None = None) -> None:
        summary = job("eval", organism.eval_config(settings, layout, name))
        target = stages if into is None else into
        target[name] = report.stage_numbers(summary, settings.eval.prefill_k)
        runs.adopt(name, run_id, flat_metrics(summary))
        r = target[name]
        log(f"[demo] {name}: HRR {r['hrr']:.3f} (refusal {r['refusal']:.3f}, degenerate {r['degenerate']:.3f}), "
            f"prefill ASR {r['prefill_asr']:.3f}, task accuracy {r['task_accuracy']:.3f}, "
            f"task loss {r['task_loss']:.3f}")

    def run_stage(name: str, kind: str) -> None:
        if kind == "basis":
            a = settings.anchor
            extract_basis(str(layout.stage("aligned") / "model"), str(layout.stage("base") / "model"),
                          layout.basis, modules=list(settings.attack.target_modules), variant=a.variant,
                          rank=a.rank, device="cpu")
            return
        if kind == "full":
            summary = job("train", organism.full_stage_config(settings, layout, name, tracking))
        elif kind == "attack":
            summary = job("train", organism.attack_config(settings, layout, name, tracking))
        elif kind == "restore":
            summary = job("restore", organism.restore_config(settings, layout, tracking))
        else:
            raise ValueError(f"demo stage {name}: unknown kind {kind!r}")
        evaluate(name, summary["mlflow_run_id"])

    try:
        with timed("setup"):
            organism.build_initial_model(settings, layout)
        for name, kind in organism.PLAN:
            with timed(name):
                run_stage(name, kind)
        frontier_rows, frontier_files = [], {}
        if frontier:
            with timed("frontier"):
                f = settings.frontier
                points: dict[str, dict] = {}
                for variant, lam, name in frontier_mod.points(f.variants, f.lambdas):
                    anchor = {"variant": variant, "lambda": lam}
                    summary = job("train", organism.attack_config(settings, layout, name, tracking, anchor))
                    evaluate(name, summary["mlflow_run_id"], into=points)
                    frontier_rows.append({"variant": variant, "lambda": lam, "stage": name, **points[name]})
                frontier_files = frontier_mod.write(frontier_rows, out / "plots")
        with timed("landscapes"):
            scapes = landscapes.run(settings, layout, out / "landscape")
        files = report.stage_plots(stages, out / "plots")
        attacks = {name: layout.stage(name) for name, kind in organism.PLAN if kind == "attack"}
        probe_png = report.probe_plot(attacks, out / "plots" / "hrr_during_training.png")
        if probe_png:
            files["hrr_during_training"] = probe_png
        found = report.checks(stages)
        result = {
            "stages": stages,
            "checks": found,
            "phenomenon_shown": all(c["ok"] for c in found.values()),
            "anchor_verdict": report.anchor_verdict(stages),
            "landscape": {name: {"alphas": r["alphas"], "hrr": r["curves"][name],
                                 "degenerate": r["degenerate"][name], "basin": r["basin"][name],
                                 "threshold": r["threshold"], "png": r["files"].get("png")}
                          for name, r in scapes.items()},
            "plots": files,
            "frontier": {"points": frontier_rows, "files": frontier_files,
                         "asft_vs_l2_matched": frontier_mod.matched(
                             frontier_rows, settings.anchor.variant, "l2", report.MATCHED_ACCURACY)}
            if frontier else None,
            "n_heldout_prompts": settings.data.heldout, "n_task_eval": settings.data.task_eval,
            "prefill_k": settings.eval.prefill_k,
            "mlflow": {"tracking_uri": uri, "experiment": EXPERIMENT, "parent_run_id": runs.run_id,
                       "stage_run_ids": runs.stage_runs},
            "stage_seconds": seconds,
            "nproc": nproc,
            "settings": settings.model_dump(mode="json", by_alias=True),
            "machine": {"cpus": os.cpu_count(), "loadavg_at_end": list(os.getloadavg())},
        }
        result["wall_seconds"] = time.perf_counter() - t_start
        path = report.write_json(result, out / "results.json")
        runs.record(result, path, [*files.values(), *(r["files"]["png"] for r in scapes.values()),
                                   *frontier_files.values()], "phenomenon_shown")
    except BaseException:
        runs.end("FAILED")
        raise
    runs.end("FINISHED")
    return result


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


def run_seeds(settings, seeds: list[int], out: Path, nproc: int, *, frontier: bool = False) -> dict:
    """The organism once per seed (sequentially, each in OUT/seed{N}/, every stage as in a one-seed
    run); mean and sd per stage and metric; the checks judged on the means."""
    from safebasin.safety_core.demo import report
    t0 = time.perf_counter()
    (out / MARKER).write_text(json.dumps({"safebasin_demo": 1, "seeds": seeds}, indent=2))
    runs = []
    for seed in seeds:
        print(f"[demo] seed {seed} ({len(runs) + 1} of {len(seeds)})", flush=True)
        sub = prepare_folder(out / f"seed{seed}")
        runs.append(run_demo(settings.model_copy(update={"seed": seed}), sub, nproc, frontier=frontier))
    agg = report.aggregate([r["stages"] for r in runs])
    mean_stages = report.means(agg)
    found = report.checks(mean_stages)
    first = runs[0]
    result = {"seeds": seeds, "stages": mean_stages, "aggregate": agg, "checks": found,
              "phenomenon_shown": all(c["ok"] for c in found.values()),
              "anchor_verdict": report.anchor_verdict(mean_stages),
              "per_seed": [{"seed": seed, "folder": str(out / f"seed{seed}"), "stages": r["stages"],
                            "checks": r["checks"], "phenomenon_shown": r["phenomenon_shown"],
                            "wall_seconds": r["wall_seconds"], "mlflow": r["mlflow"]}
                           for seed, r in zip(seeds, runs)],
              "n_heldout_prompts": first["n_heldout_prompts"], "n_task_eval": first["n_task_eval"],
              "prefill_k": first["prefill_k"], "nproc": nproc, "mlflow": first["mlflow"],
              "wall_seconds": time.perf_counter() - t0}
    report.write_json(result, out / "results.json")
    return result


def cmd_demo(args) -> int:
    from safebasin.safety_core.demo import report
    if args.organism == "smollm2":
        from safebasin.launcher import demo_smollm2
        return demo_smollm2.cmd(args)
    if args.resume or args.combine:
        raise ConfigError(["--resume and --combine are for --organism smollm2 (the tiny demo reruns in minutes)"])
    if args.nproc < 1:
        raise ConfigError([f"--nproc must be >= 1, got {args.nproc}"])
    seeds = parse_seeds(args.seeds)
    settings = load_settings(args.quick, args.overrides)
    out = prepare_folder(Path(args.out), args.overwrite)
    if seeds is None:
        result = run_demo(settings, out, args.nproc, frontier=args.frontier)
        sd, what = None, f"seed {settings.seed}"
    else:
        result = run_seeds(settings, seeds, out, args.nproc, frontier=args.frontier)
        sd, what = result["aggregate"], f"mean ± sd over seeds {','.join(map(str, seeds))}"
    if args.json:
        report.write_json(result, args.json)
    print()
    print(f"{what}:")
    print(report.table(result["stages"], result["prefill_k"], result["n_heldout_prompts"], result["n_task_eval"],
                       sd=sd))
    print(report.check_lines(result["checks"]))
    print(f"  {result['anchor_verdict']}")
    if seeds is not None:
        for run in result["per_seed"]:
            failed = [k for k, c in run["checks"].items() if not c["ok"]]
            print(f"  seed {run['seed']}: " + ("every check holds" if not failed else "fails " + ", ".join(failed)))
    print(f"\nsafebasin demo: {'the phenomenon is shown' if result['phenomenon_shown'] else 'NOT every check holds'}"
          f"{' (on the means)' if seeds else ''}; {result['wall_seconds']:.0f} s on {result['nproc']} rank(s)")
    print(f"  results: {(out / 'results.json').resolve()}")
    if seeds is None:
        print(f"  plots:   {(out / 'plots').resolve()}, {(out / 'landscape').resolve()}")
        if result["frontier"]:
            print(f"  frontier: {result['frontier']['files']['csv']}, {result['frontier']['files']['png']}")
    m = result["mlflow"]
    print(f"  MLflow:  parent run {m['parent_run_id']} in experiment {m['experiment']!r} at {m['tracking_uri']}"
          f"{' (seed ' + str(seeds[0]) + '; each seed has its own)' if seeds else ''}"
          f"  (view: mlflow ui --backend-store-uri {m['tracking_uri']})")
    return 3 if args.check and not result["phenomenon_shown"] else 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="the model-organism demo: align a tiny model, attack it with a "
                       "harmful fine-tune, anchor and restore it; offline, a few minutes on a CPU")
    p.add_argument("overrides", nargs="*", help="dotted settings overrides, e.g. attack.fraction=0.3 "
                   "(see safebasin/safety_core/demo/settings.py)")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo); a non-empty "
                   "one is refused (a previous demo's folder: see --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="--out holds a previous demo: move it aside "
                   "to OUT.replaced-TIME and start over (nothing is deleted)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results JSON here")
    p.add_argument("--nproc", type=int, default=1, help="ranks for the training, restoration and "
                   "evaluation stages (default 1: everything in this process)")
    p.add_argument("--organism", choices=["tiny", "smollm2"], default="tiny", help="tiny: a random tiny "
                   "Llama on synthetic data (default); smollm2: the real SmolLM2-135M-Instruct on public "
                   "safety data (see docs/results.md)")
    p.add_argument("--quick", action="store_true", help="every stage tiny (tests the pipeline, not "
                   "the phenomenon); with --organism smollm2, its reduced preset")
    p.add_argument("--frontier", action="store_true", help="also retrain the attack for each lambda of "
                   "each anchor variant (settings frontier.variants, frontier.lambdas) and plot HRR against "
                   "task accuracy (plots/frontier.png, plots/frontier.csv)")
    p.add_argument("--check", action="store_true", help="exit with status 3 when a check of the "
                   "phenomenon fails (with --seeds: a check on the means)")
    p.add_argument("--seeds", default=None, metavar="LIST", help="e.g. 0,1,2: run the organism once per "
                   "seed (sequentially, in OUT/seed{N}/) and report mean and sd per stage and metric; "
                   "default: one run with the settings' seed")
    p.add_argument("--resume", action="store_true", help="--organism smollm2: continue the demo in --out "
                   "(same settings): finished stages are kept (progress.json), the rest run")
    p.add_argument("--combine", nargs="+", default=None, metavar="DIR", help="--organism smollm2: join seeds "
                   "run separately (e.g. side by side, one thread each) into one result in --out: mean and "
                   "sd per stage, the targets checked on the means")
    p.set_defaults(func=cmd_demo)
