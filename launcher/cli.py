"""`safebasin` console script."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safebasin.launcher.config import ConfigError, JobConfig, dump, load_config
from safebasin.safety_core.data import DataError


def _add_job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. deepspeed.stage=3 train.max_steps=20")
    p.add_argument("--nproc", type=int, default=1, help="ranks on this node (default 1)")


def prepare_output(cfg: JobConfig, resume: bool) -> Path:
    """Refuse to run over a previous job's results unless resuming; write the resolved config."""
    out = Path(cfg.output.dir)
    if not resume and (out / "checkpoints").exists():
        raise ConfigError([f"output.dir {out} already holds checkpoints of a job: pass --resume to "
                           f"continue it, or choose another output.dir"])
    return dump(cfg, out / "config.yaml")


def run_job(command: str, cfg: JobConfig, args) -> dict:
    """Run a rank command (entry.RANK_COMMANDS) on --nproc local ranks; returns rank 0's summary,
    which every rank command also writes to OUTPUT/results.json."""
    resume = getattr(args, "resume", False)
    resolved = prepare_output(cfg, resume)
    if args.nproc > 1:
        from safebasin.launcher.launch import launch_local
        code = launch_local(command, resolved, args.nproc, ["--resume"] if resume else [])
        if code != 0:
            raise SystemExit(code)
        return json.loads((Path(cfg.output.dir) / "results.json").read_text())
    from safebasin.launcher.entry import RANK_COMMANDS
    from safebasin.launcher.launch import single_process_env
    single_process_env()
    return RANK_COMMANDS[command](load_config(resolved), resume)


def cmd_train(args) -> int:
    cfg = load_config(args.config, args.overrides)
    cfg.require("data", "train")
    print_summary(run_job("train", cfg, args), cfg)
    return 0


def print_summary(summary: dict, cfg: JobConfig) -> None:
    m = summary.get("metrics", {})
    print(f"\nsafebasin: trained {summary['steps']} steps; final loss {m.get('loss', float('nan')):.4f}"
          + (f", eval loss {m['eval_loss']:.4f}" if "eval_loss" in m else ""))
    print(f"  output:   {summary['output_dir']}")
    print(f"  exported: {summary['final']}")
    if summary.get("mlflow_run_id"):
        print(f"  MLflow:   run {summary['mlflow_run_id']} in experiment {cfg.tracking.experiment!r} at "
              f"{cfg.tracking.resolved_uri()}  (view: mlflow ui --backend-store-uri {cfg.tracking.resolved_uri()})")


def cmd_tiny_model(args) -> int:
    from safebasin.safety_core.tiny import build_tiny_model
    out = build_tiny_model(args.out_dir, hidden_size=args.hidden_size, num_layers=args.layers,
                           num_heads=args.heads, num_kv_heads=args.kv_heads,
                           intermediate_size=args.intermediate_size, vocab_size=args.vocab_size,
                           seed=args.seed)
    print(f"tiny model and tokenizer written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safebasin", description="Safety-anchored fine-tuning and "
                                     "curvature-aware safety restoration on DeepSpeed.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune (LoRA or full) under DeepSpeed ZeRO 0-3")
    _add_job_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("tiny-model", help="write a tiny random Llama model and a local tokenizer")
    p.add_argument("out_dir")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate-size", type=int, default=176)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tiny_model)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except (ConfigError, DataError) as e:
        print(f"safebasin {args.command}: {e}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()
