"""What every rank runs: `python -m safebasin.launcher.entry COMMAND RESOLVED_CONFIG [--resume]`.

The console command validates the config and writes it resolved before any rank starts, so
ranks never see a bad config.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from safebasin.launcher.config import JobConfig, load_config
from safebasin.launcher.launch import single_process_env
from safebasin.launcher.tracking import Tracker


def global_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def run_train(cfg: JobConfig, resume: bool) -> dict:
    from safebasin.safety_core.trainer import train
    cfg.require("data", "train")
    out = Path(cfg.output.dir)
    tracker = Tracker(cfg, out, active=global_rank() == 0)
    try:
        result = train(cfg.model, cfg.method, cfg.data, cfg.train, cfg.deepspeed, out,
                       log_fn=tracker.log_metrics, resume=resume,
                       client_state={"mlflow_run_id": tracker.run_id})
    except BaseException:
        tracker.end("FAILED")
        raise
    summary = {"output_dir": str(out.resolve()), "final": str(result.final_dir.resolve()),
               "steps": result.steps, "metrics": result.metrics, "mlflow_run_id": tracker.run_id}
    if global_rank() == 0:
        (out / "results.json").write_text(json.dumps(summary, indent=2))
        for name in ("config.yaml", "results.json", "metrics.jsonl", "ds_config.json"):
            tracker.log_artifact(out / name)
    tracker.end()
    return summary


RANK_COMMANDS = {"train": run_train}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="safebasin.launcher.entry")
    parser.add_argument("command", choices=sorted(RANK_COMMANDS))
    parser.add_argument("config")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    single_process_env()
    RANK_COMMANDS[args.command](load_config(args.config), args.resume)


if __name__ == "__main__":
    main()
