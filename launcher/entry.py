"""What every rank runs: `python -m safebasin.launcher.entry COMMAND RESOLVED_CONFIG [--resume]`.

The console command validates the config and writes it resolved before any rank starts, so
ranks never see a bad config.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

from safebasin.launcher.config import JobConfig, load_config
from safebasin.launcher.launch import single_process_env
from safebasin.launcher.measure import run_eval, run_landscape
from safebasin.launcher.outputs import write_results
from safebasin.launcher.tracking import Tracker
from safebasin.safety_core.runtime import apply_threads
from safebasin.safety_core.progress import library_bars_off


def global_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def run_train(cfg: JobConfig, resume: bool) -> dict:
    from safebasin.safety_core.train.trainer import train
    cfg.require("data", "train")
    out = Path(cfg.output.dir)
    # MLflow opens its store on a thread of its own while the model loads; the big modules the
    # job needs are imported here first, so the two threads do not import the same modules.
    from safebasin.safety_core.runtime import import_deepspeed
    import_deepspeed()
    import peft  # noqa: F401
    import transformers  # noqa: F401
    tracker = Tracker(cfg, out, active=global_rank() == 0, reattach=resume)
    try:
        factory = None
        if cfg.anchor is not None:
            from safebasin.safety_core.anchor.regularizer import anchor_factory
            factory = anchor_factory(cfg.anchor)
        hooks = ()
        if cfg.train.safety_probe is not None:
            from safebasin.safety_core.measure.probe import SafetyProbe
            hooks = lambda tokenizer: [SafetyProbe(cfg.train.safety_probe, tokenizer)]
        result = train(cfg.model, cfg.method, cfg.data, cfg.train, cfg.deepspeed, out,
                       regularizer_factory=factory, log_fn=tracker.log_metrics, resume=resume,
                       client_state=lambda: {"mlflow_run_id": tracker.run_id},
                       data_summary_fn=lambda s: _log_data_summary(tracker, s, out), step_hooks=hooks)
    except BaseException:
        tracker.end("FAILED")
        raise
    summary = {"output_dir": str(out.resolve()), "final": str(result.final_dir.resolve()),
               "steps": result.steps, "metrics": result.metrics, "mlflow_run_id": tracker.run_id}
    if global_rank() == 0:
        write_results(out, summary)
        for name in ("config.yaml", "results.json", "metrics.jsonl", "ds_config.json"):
            tracker.log_artifact(out / name)
    tracker.end()
    return summary


def _log_data_summary(tracker: Tracker, summary: dict, out: Path) -> None:
    from safebasin.safety_core.train.summary import SUMMARY_FILE, flat_metrics
    tracker.log_metrics(flat_metrics(summary), step=0)
    tracker.log_artifact(out / SUMMARY_FILE)


def run_restore(cfg: JobConfig, resume: bool = False) -> dict:
    from safebasin.safety_core.restore.loop import restore
    cfg.require("restore")
    out = Path(cfg.output.dir)
    # A restore never resumes: it never reattaches to a run an earlier job left in this folder.
    tracker = Tracker(cfg, out, active=global_rank() == 0)
    try:
        # MLflow takes numbers: the accepted flag is logged as 0/1.
        result = restore(cfg.model, cfg.method, cfg.restore, cfg.deepspeed, out,
                         log_fn=lambda row, it: tracker.log_metrics({**row, "accepted": int(row["accepted"])}, it))
    except BaseException:
        tracker.end("FAILED")
        raise
    summary = {"output_dir": str(out.resolve()), "final": str(result.final_dir.resolve()),
               "iterations": len(result.rows), "metrics": result.rows[-1] if result.rows else {},
               **result.summary, "mlflow_run_id": tracker.run_id}
    if global_rank() == 0:
        write_results(out, summary)
        tracker.log_metrics({f"initial_{k}": v for k, v in result.summary["initial"].items()}, 0)
        for name in ("config.yaml", "results.json", "metrics.jsonl"):
            tracker.log_artifact(out / name)
    tracker.end()
    return summary


RANK_COMMANDS = {"eval": run_eval, "landscape": run_landscape, "train": run_train, "restore": run_restore}


def run_rank_command(command: str, cfg: JobConfig, resume: bool = False) -> dict:
    """Every rank command starts here, on every rank (and in-process for one rank): cuda:LOCAL_RANK
    becomes the process's current device before the command loads a model or joins a collective,
    so nothing that takes "cuda" without an index (NCCL, judges, DeepSpeed) lands on GPU 0."""
    from safebasin.safety_core.distributed import collective_timeout, explain_timeout, rank_device
    rank_device()
    try:
        return RANK_COMMANDS[command](cfg, resume)
    except Exception as e:
        # A peer that hangs shows here as a library's "Timed out waiting ...ms": said in words,
        # with the rank that stopped answering.
        hung = explain_timeout(e, collective_timeout(cfg.deepspeed.timeout_minutes))
        if hung is None:
            raise
        raise hung from e


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="safebasin.launcher.entry")
    parser.add_argument("command", choices=sorted(RANK_COMMANDS))
    parser.add_argument("config")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not Path(args.config).is_file():
        # A hostfile launch writes the resolved config on the launching host only.
        raise SystemExit(f"safebasin rank {global_rank()} on {os.uname().nodename}: {args.config} does not "
                         f"exist here; --hostfile runs need output.dir on a filesystem shared by all hosts "
                         f"(else launch per node with --nnodes/--node-rank)")
    single_process_env()
    library_bars_off()
    cfg = load_config(args.config)
    apply_threads(cfg.runtime)
    run_rank_command(args.command, cfg, args.resume)
    if _leave_group() > 1:
        # Everything is written by now (results, checkpoints, the MLflow run ended and
        # acknowledged). Interpreter finalisation would next destroy what DeepSpeed keeps alive
        # in reference cycles and C++ statics (gloo groups cloned from the world, their threads)
        # after the peer has closed its sockets: where that aborted ('terminate called without
        # an active exception', exit 134), a job whose every step had finished failed. A rank
        # of a multi-rank job therefore ends here, without finalisation.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _leave_group() -> int:
    """Ranks leave together and close every group (the default one and all DeepSpeed made from
    it) before the interpreter exits: a rank that exits while a peer still talks to it can abort
    in C++ teardown after its work was done. Returns the world size it left (1 if none)."""
    import torch.distributed as dist
    if not dist.is_initialized():
        return 1
    world = dist.get_world_size()
    dist.barrier()
    gc.collect()  # engines and partitioned parameters released while the groups still exist
    dist.destroy_process_group()  # no argument: every group, not only the default one
    return world


if __name__ == "__main__":
    main()
