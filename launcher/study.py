"""`safebasin study FILE.yaml`: run a study (safety_core/study) with this package's job launcher
and MLflow parent run: options, the output folder's rule, and the printed result. `safebasin
demo` runs its study file through `execute` and `show` too.
"""

from __future__ import annotations

from pathlib import Path

from safebasin.launcher.config import ConfigError, TrackingArgs, build
from safebasin.launcher.runs import DemoRuns, launch_args, parse_seeds, prepare_folder

COMMAND_NEEDS = {"train": ("data", "train"), "restore": ("restore",), "eval": ("eval",), "landscape": ("landscape",)}


class LauncherJobs:
    """The runner's jobs: each stage config validated as the command's own config would be, and
    run through run_job on --nproc ranks (a half-done output folder moved aside first)."""

    def __init__(self, nproc: int):
        self.nproc = nproc

    def problems(self, command: str, config: dict) -> list[str]:
        try:
            cfg = build(config)
        except ConfigError as e:
            return e.problems
        return [f"{s}: the {command} command needs a '{s}:' section" for s in COMMAND_NEEDS[command]
                if getattr(cfg, s) is None]

    def run(self, command: str, config: dict) -> dict:
        from safebasin.launcher.jobs import run_job
        args = launch_args(self.nproc)
        args.overwrite = Path(config["output"]["dir"]).exists()
        return run_job(command, build(config), args)

    def aside(self, folder: Path) -> Path:
        from safebasin.launcher.outputs import move_aside
        return move_aside(folder, [])


def execute(file, overrides: list[str], preset: str | None, args, *, markers: tuple[str, ...] = (),
            what: str = "study"):
    """Run (or --plan, --resume, --combine) a study file with the run options of `args` (out,
    seeds, resume, combine, overwrite, nproc, plan, stages): (study, output folder, result; None
    with --plan). `markers`: other marker files whose folders --overwrite may move aside too (the
    demo's). A refused study is a ConfigError listing every fault, before any job starts."""
    import torch
    from safebasin.safety_core.study import plan as plan_mod
    from safebasin.safety_core.study import runner, spec
    out, seeds, resume, combine, nproc = args.out, args.seeds, args.resume, args.combine, args.nproc
    overwrite, plan_only = args.overwrite, getattr(args, "plan", False)
    if nproc < 1:
        raise ConfigError([f"--nproc must be >= 1, got {nproc}"])
    try:
        study, raw = spec.read(file, overrides, preset)
        plan = plan_mod.check(study)
        stages = getattr(args, "stages", None)
        if stages:
            if combine:
                raise ConfigError(["--stages runs stages; --combine joins the stages its folders ran"])
            plan = plan_mod.select(plan, [n.strip() for n in stages.split(",") if n.strip()])
        out = Path(out or f"runs/{study.name}")
        uri = TrackingArgs().resolved_uri()
        folder_markers = (runner.MARKER, *markers)

        def parent(folder: Path, label: str = "") -> DemoRuns:
            return DemoRuns(uri, f"study {study.name} {folder.name}{label}", raw, experiment=study.tracking.experiment)
        if combine:
            from safebasin.launcher.outputs import check_combine
            check_combine(out, combine, resume, seeds)
            result = runner.combine(plan, raw, [Path(f) for f in combine],
                                    lambda: prepare_folder(out, overwrite, folder_markers, what),
                                    lambda folder: parent(folder, " (combined)"))
            return study, out, result
        asked = parse_seeds(seeds)
        chosen = runner.recorded_seeds(out, asked) if resume else asked or [study.seed]
        resolved = runner.prepare(plan, chosen, out, LauncherJobs(nproc))
        if plan_only:
            print(f"study {study.name}: valid; stages in order: {', '.join(plan.order)}; evaluated: "
                  f"{', '.join(plan.evaluated)}; seeds {chosen}; output {out}")
            return study, out, None
        if not resume:
            prepare_folder(out, overwrite, folder_markers, what)
            runner.write_marker(out, raw, chosen)
        else:
            runner.resumed_marker(out, raw)
        torch.set_num_threads(study.threads)
        runs = parent(out, " (resumed)" if resume else "")
        try:
            result = runner.run(plan, resolved, out, LauncherJobs(nproc), runs)
        except BaseException:
            runs.end("FAILED")
            raise
        runs.end("FINISHED")
        return study, out, result
    except spec.StudyError as e:
        raise ConfigError(e.problems) from None


def show(study, result: dict, out: Path, *, command: str, holds: str, nproc: int | None = None) -> None:
    """The printed result: the table (mean ± sd over several seeds) with its caption, the checks,
    the verdicts, each seed's failed checks, and where the outputs are."""
    from safebasin.safety_core.study import report, runner
    seeds = result["seeds"]
    several = len(seeds) > 1
    print()
    print(f"{'mean ± sd over seeds ' + ','.join(map(str, seeds)) if several else f'seed {seeds[0]}'}:")
    print(report.table(study, result["stages"], sd=result["aggregate"] if several else None,
                       caption=result.get("caption", "")))
    print(report.check_lines(result["checks"]))
    for sentence in (result.get("verdicts") or {}).values():
        if sentence:
            print(f"  {sentence}")
    if several:
        for seed, found in result["per_seed_checks"].items():
            failed = [k for k, c in found.items() if c["ok"] is False]
            print(f"  seed {seed}: " + ("every check holds" if not failed else "fails " + ", ".join(failed)))
    judged = [c for c in result["checks"].values() if c["ok"] is not None]
    verdict = ("no check evaluated (the stages they read did not run)" if not judged
               else holds if result["all_checks_hold"] else "NOT every check holds")
    ranks = f" on {nproc} rank(s)" if nproc is not None else ""
    print(f"\n{command}: {verdict}{' (on the means)' if several else ''}; {result['wall_seconds']:.0f} s{ranks}")
    print(f"  results: {(out / runner.RESULTS).resolve()}")
    scapes = sorted({str(Path(s["png"]).parent.parent) for seed in (result.get("landscapes") or {}).values()
                     for s in seed.values() if s.get("png")})
    print(f"  plots:   {(out / 'plots').resolve()}" + "".join(f", {s}" for s in scapes))
    for name, sweep in (result.get("sweeps") or {}).items():
        print(f"  {name}: " + ", ".join(sweep["files"].values()))
        if sweep.get("verdict"):
            print(f"    {sweep['verdict']}")
    m = result["mlflow"]
    print(f"  MLflow:  parent run {m['parent_run_id']} in experiment {m['experiment']!r} at {m['tracking_uri']}"
          f"  (view: mlflow ui --backend-store-uri {m['tracking_uri']})")


def cmd_study(args) -> int:
    from safebasin.safety_core.study import report
    study, out, result = execute(args.file, args.overrides, args.preset, args)
    if result is None:
        return 0
    if args.json:
        report.write_json(result, Path(args.json))
    show(study, result, out, command=f"safebasin study {study.name}", holds="every check holds")
    return 3 if args.check and not result["all_checks_hold"] else 0


def add_stages_arg(p) -> None:
    p.add_argument("--stages", default=None, metavar="LIST", help="e.g. lora,restored: run only these stages "
                   "and the stages they read (a finished one is kept with --resume); an enabled sweep's name "
                   "(e.g. frontier) runs its points, a point's name (frontier-l2-1) that point; the checks over "
                   "stages that did not run are reported as not evaluated")


def register(sub) -> None:
    p = sub.add_parser("study", help="run a study file: models, data, stages (job configs of the commands "
                       "above), evaluation suites, checks and plots (see README, Studies)")
    p.add_argument("file", help="the study YAML, e.g. examples/studies/tiny.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the study file, e.g. vars.attack.fraction=0.5 "
                   "or stages.lora.config.train.lr=1e-3")
    p.add_argument("--out", default=None, help="output folder (default runs/<study name>); a non-empty one is "
                   "refused (a previous study's folder: see --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="--out holds a previous study: move it aside to "
                   "OUT.replaced-TIME and start over (nothing is deleted)")
    p.add_argument("--seeds", default=None, metavar="LIST", help="e.g. 0,1,2: each seed in OUT/seed<N>/; the "
                   "checks on the means (default: the study's seed)")
    p.add_argument("--resume", action="store_true", help="continue the study in --out: finished stages are "
                   "kept (if their config is unchanged), unfinished ones run again")
    p.add_argument("--combine", nargs="+", default=None, metavar="DIR", help="join study folders run apart "
                   "(the same study, other seeds) into one result in --out")
    p.add_argument("--check", action="store_true", help="exit with status 3 when a check fails (on the means)")
    p.add_argument("--preset", default=None, help="merge the study's presets.NAME over it (e.g. quick)")
    p.add_argument("--plan", action="store_true", help="validate the study and print its stage order; run nothing")
    add_stages_arg(p)
    p.add_argument("--nproc", type=int, default=1, help="ranks for the train, restore and eval jobs")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results JSON here")
    p.set_defaults(func=cmd_study)
