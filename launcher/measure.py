"""The measurement commands: `safebasin eval`, `safebasin judge`, `safebasin landscape`.

eval and landscape are rank commands (entry.RANK_COMMANDS): with --nproc N each rank takes a
disjoint shard of the prompts and rank 0 gathers, logs to MLflow and writes the results.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safebasin.launcher.config import ConfigError, JobConfig
from safebasin.launcher.outputs import write_results
from safebasin.launcher.tracking import Tracker


def _init_ranks(cfg: JobConfig) -> tuple[int, torch.device]:
    """Bind this rank's device and join the process group when started on several ranks;
    returns (global rank, device)."""
    from safebasin.safety_core.distributed import init_distributed, rank_device
    device = rank_device()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        init_distributed(cfg.deepspeed.timeout_minutes)
    return int(os.environ.get("RANK", "0")), device


def evaluated_name(model_args) -> str:
    """What an eval run measured, for its MLflow run name: the adapter folder (with its parent,
    since exports are named adapter/ or model/) or else the model."""
    target = model_args.adapter or model_args.path
    if target.startswith("builtin:") or not Path(target).exists():
        return f"eval {target}"
    path = Path(target).resolve()
    return f"eval {path.parent.name}/{path.name}" if path.name in ("adapter", "model") else f"eval {path.name}"


def run_eval(cfg: JobConfig, resume: bool = False) -> dict:
    from safebasin.safety_core.measure.evaluation import (
        RECORDS_FILE,
        RESULTS_FILE,
        evaluate,
        flat_metrics,
    )
    from safebasin.safety_core.train.modeling import load_model, load_tokenizer
    cfg.require("eval")
    (rank, device), out = _init_ranks(cfg), Path(cfg.output.dir)
    tracker = Tracker(cfg, out, active=rank == 0, default_run_name=evaluated_name(cfg.model))
    try:
        engine, args = None, cfg.eval
        if args.engine == "vllm":
            from safebasin.safety_core.measure.vllm_engine import (
                VllmEngine,
                vllm_problem,
            )
            problem = vllm_problem(int(os.environ.get("WORLD_SIZE", "1")))
            if problem:
                raise ConfigError([problem])
            engine = VllmEngine(cfg.model, args.vllm_gpu_memory, _vllm_model_len(cfg, args))
        takes_loss = args.task is not None and args.task_loss
        model = None
        if engine is None:
            model = load_model(cfg.model).to(device).eval()
        elif takes_loss:  # loaded once vLLM is closed, never beside it
            model = lambda: load_model(cfg.model).to(device).eval()  # noqa: E731
        result = evaluate(model, load_tokenizer(cfg.model), args, out_dir=out, engine=engine)
    except BaseException:
        tracker.end("FAILED")
        raise
    summary = {k: v for k, v in result.items() if k != "records"}
    summary["mlflow_run_id"] = tracker.run_id
    if rank == 0:
        # The one results file: evaluate() wrote it; it gains the MLflow run id here.
        write_results(out, summary)
        tracker.log_metrics(flat_metrics(result))
        for name in ("config.yaml", RESULTS_FILE, RECORDS_FILE):
            tracker.log_artifact(out / name)
    tracker.end()
    return summary


def _vllm_model_len(cfg: JobConfig, args) -> int:
    """eval.vllm_max_model_len, or what this eval's longest prompt and answer need."""
    if args.vllm_max_model_len is not None:
        return args.vllm_max_model_len
    from safebasin.safety_core.measure.evaluation import task_conversations
    from safebasin.safety_core.measure.vllm_engine import needed_model_len
    from safebasin.safety_core.train.data import load_prompts
    from safebasin.safety_core.train.modeling import load_tokenizer
    sets = [load_prompts(args.harmful, args.system_prompt)] if args.harmful is not None else []
    if args.task is not None:
        sets.append(task_conversations(args))
    new_tokens = max(args.max_new_tokens + max(args.prefill_k, default=0),
                     args.generation_budget() if args.task is not None else 0)
    return needed_model_len(load_tokenizer(cfg.model), sets, new_tokens)


def run_landscape(cfg: JobConfig, resume: bool = False) -> dict:
    from safebasin.safety_core.measure.landscape_job import run_landscapes
    cfg.require("landscape")
    (rank, device), out = _init_ranks(cfg), Path(cfg.output.dir)
    tracker = Tracker(cfg, out, active=rank == 0)
    try:
        result = run_landscapes(cfg.model, cfg.landscape, out, device)
    except BaseException:
        tracker.end("FAILED")
        raise
    result["mlflow_run_id"] = tracker.run_id
    if rank == 0:
        write_results(out, result)
        for path, corr in result.get("correlation", {}).items():
            tracker.log_metrics({f"pearson.{Path(path).stem}": corr["pearson"],
                                 f"spearman.{Path(path).stem}": corr["spearman"]})
        loss = result.get("loss_landscape", {})
        tracker.log_metrics({k: v for k, v in loss.items() if isinstance(v, float)})
        for name, basin in result.get("safety_landscape", {}).get("basin", {}).items():
            tracker.log_metrics({f"basin_width.{name}": basin["width"]})
        for png in sorted(out.rglob("*.png")) + sorted(out.rglob("*.csv")):
            tracker.log_artifact(png, str(png.parent.relative_to(out)) if png.parent != out else None)
        tracker.log_artifact(out / "results.json")
    tracker.end()
    return result


def cmd_eval(args) -> int:
    from safebasin.launcher.config import load_config
    from safebasin.launcher.jobs import run_job
    cfg = load_config(args.config, args.overrides)
    cfg.require("eval")
    summary = run_job("eval", cfg, args)
    results = Path(summary["files"]["results"]).resolve()
    if args.json:
        shutil.copyfile(results, args.json)
    asr = ", ".join(f"K={k}: {v:.3f}" for k, v in summary.get("prefill_asr", {}).items() if v is not None)
    parts = summary.get("breakdown") or {}
    split = ", ".join(f"{kind} {_fmt(parts.get(kind))}" for kind in ("refusal", "compliance", "degenerate"))
    print(f"\nsafebasin eval: HRR {_fmt(summary.get('hrr'))} ({summary.get('judge')}, "
          f"{summary.get('n_harmful')} prompts, {summary.get('unparsed')} unparsed"
          + (f"; {split}" if parts else "") + ")"
          + (f"; prefill ASR {asr}" if asr else "")
          + f"; task loss {_fmt(summary.get('task_loss'))}, accuracy {_fmt(summary.get('task_accuracy'))}")
    print(f"  results: {results}" + (f" (copied to {Path(args.json).resolve()})" if args.json else ""))
    print(f"  per-example records: {Path(summary['files']['records']).resolve()}")
    return 0


def cmd_landscape(args) -> int:
    from safebasin.launcher.config import load_config
    from safebasin.launcher.jobs import run_job
    overrides = list(args.overrides) + ([f"output.dir={args.out}"] if args.out else [])
    cfg = load_config(args.config, overrides)
    cfg.require("landscape")
    result = run_job("landscape", cfg, args)
    for path, corr in result.get("correlation", {}).items():
        print(f"loss correlation on {path}: Pearson {corr['pearson']:.3f}, Spearman {corr['spearman']:.3f}")
    loss = result.get("loss_landscape", {})
    if "structural_difference_pct" in loss:
        print(f"structural difference of the loss landscapes: {loss['structural_difference_pct']:.2f}%")
    for name, basin in result.get("safety_landscape", {}).get("basin", {}).items():
        print(f"basin width along {name}: {basin['width']:.3f}")
    print(f"plots and CSV grids under {Path(cfg.output.dir).resolve()}")
    return 0


def cmd_judge(args) -> int:
    from safebasin.launcher.config import ConfigError
    from safebasin.launcher.outputs import overlap_problems
    from safebasin.safety_core.measure.judges import (
        JudgeArgs,
        judge_records,
        load_judge_records,
        make_judge,
    )
    if not Path(args.input).is_file():
        raise ConfigError([f"--input {args.input}: {'a folder, not a JSONL file' if Path(args.input).is_dir() else 'no such file'}"])
    problems = overlap_problems("--json", args.json, [("--input", args.input)])
    if problems:
        raise ConfigError(problems)
    try:
        records = load_judge_records(args.input)
    except ValueError as e:
        raise ConfigError([str(e)]) from None
    judge_args = JudgeArgs(name=args.judge, model=args.model, harmful_label=args.harmful_label,
                           batch_size=args.batch_size)
    result = judge_records(make_judge(judge_args), records, batch_size=args.batch_size)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"{result['n']} records judged by {args.judge}: HRR {_fmt(result['hrr'])} (refusal "
          f"{_fmt(result['refusal_rate'])}, compliance {_fmt(result['compliance_rate'])}, degenerate "
          f"{_fmt(result['degenerate_rate'])}), {result['unparsed']} unparsed -> {args.json}", file=sys.stderr)
    return 0


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def register(sub, add_job_args) -> None:
    p = sub.add_parser("eval", help="harmful-response rate, prefilling attacks and task utility")
    add_job_args(p)
    p.add_argument("--json", default=None, help="also write the results JSON here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("judge", help="judge existing (prompt, response) records")
    p.add_argument("--judge", required=True, choices=["keyword", "llama-guard", "classifier"])
    p.add_argument("--input", required=True, help="JSONL with prompt and response fields")
    p.add_argument("--json", required=True, help="output JSON with hrr and per-record verdicts")
    p.add_argument("--model", default=None, help="judge model (llama-guard, classifier): folder or hub id")
    p.add_argument("--harmful-label", default=None, help="classifier: the label name or id meaning harmful")
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=cmd_judge)

    p = sub.add_parser("landscape", help="loss correlation, loss landscapes and the safety landscape")
    add_job_args(p)
    p.add_argument("--out", default=None, help="output folder (sets output.dir)")
    p.set_defaults(func=cmd_landscape)
