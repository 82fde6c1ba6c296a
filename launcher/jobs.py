"""Running a job command (train, restore, eval, landscape) on its ranks: the command-line
options every job command takes, the output folder's rules (launcher.outputs) and the input
checks (launcher.preflight) applied before any rank starts, then the launch."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from safebasin.launcher.config import ConfigError, JobConfig, dump, load_config
from safebasin.launcher.topology import add_launch_args, describe, resolve
from safebasin.safety_core.train import integrity
from safebasin.safety_core.train.checkpoints import convert_if_needed, resume_accumulation


def add_job_args(p: argparse.ArgumentParser, resumable: bool = False) -> None:
    p.add_argument("config", help="YAML config")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. deepspeed.stage=3 train.max_steps=20 "
                   "(before, after or between the options)")
    add_launch_args(p)
    again = p.add_mutually_exclusive_group()
    if resumable:
        again.add_argument("--resume", action="store_true", help="continue from the newest checkpoint "
                           "(the plan keys must be unchanged: see docs/train.md)")
        again.add_argument("--resume-from", metavar="TAG", default=None,
                           help="continue from the checkpoint TAG (stepN), e.g. when the newest is damaged; "
                           "newer checkpoints are moved aside to checkpoints/set-aside (nothing is deleted)")
    again.add_argument("--overwrite", action="store_true", help="output.dir holds a previous job's results: "
                       "move them aside to OUTPUT.replaced-TIME and start over (nothing is deleted)")


def prepare_output(cfg: JobConfig, resume: bool, overwrite: bool = False, topo=None) -> Path:
    """Refuse to run over a previous job's results unless resuming (plan unchanged) or told to
    move them aside; write the resolved config."""
    from safebasin.launcher.outputs import (
        check_resume_plan,
        local_store,
        move_aside,
        previous_results,
        refuse_previous,
    )
    out = Path(cfg.output.dir)
    held = previous_results(out)
    if resume and (out / "checkpoints" / "latest").is_file():
        check_resume_plan(cfg, out, topo.world_size if topo is not None else 1)
    elif resume and held:
        raise ConfigError([f"--resume: output.dir {out} holds no checkpoint to resume from, but holds a "
                           f"previous job's {', '.join(held)}: pass --overwrite to move them aside and start "
                           f"over, or choose another output.dir"])
    elif held:
        if not overwrite:
            raise refuse_previous(out, "output.dir", held, can_resume=True)
        # With a shared output.dir only node 0 moves the folder; the other nodes' checks may come
        # before or after the move and both let them through.
        if topo is None or topo.node_rank == 0:
            dest = move_aside(out, [("the current directory", os.getcwd()),
                                    ("the MLflow store", local_store(cfg.tracking.resolved_uri()))])
            print(f"safebasin: --overwrite: the previous results in {out} moved aside to {dest}", flush=True)
    return dump(cfg, out / "config.yaml")


def run_job(command: str, cfg: JobConfig, args) -> dict:
    """Run a rank command (entry.RANK_COMMANDS) on the ranks the launch options ask for: this
    process, this node, this node's share of a per-node launch, or a hostfile's hosts. Returns
    rank 0's summary, which every rank command also writes to OUTPUT/results.json. On a node
    other than node rank 0 it ends the process once the node's ranks are done (the summary is
    printed by node 0, whose disk holds it when OUTPUT is not shared). Every input is checked
    here first (preflight), so a bad one fails in one line before any rank starts."""
    from safebasin.launcher.preflight import check_inputs
    resume_from = getattr(args, "resume_from", None)
    resume = getattr(args, "resume", False) or resume_from is not None
    topo = resolve(args)
    check_inputs(cfg, command)
    finished = Path(cfg.output.dir) / "results.json"
    if resume and finished.is_file():
        if (Path(cfg.output.dir) / "checkpoints" / "latest").is_file():
            from safebasin.launcher.outputs import check_resume_plan
            check_resume_plan(cfg, Path(cfg.output.dir), topo.world_size)
        print(f"safebasin {command}: output.dir {cfg.output.dir} holds a finished run (results.json): nothing "
              f"to resume; every output is left as it was")
        return json.loads(finished.read_text())
    if resume and topo.node_rank == 0:
        # Before anything reads the checkpoint (the plan checks read its states): a damaged one
        # is refused naming its files, or set aside for the one asked for.
        ckpt_root = Path(cfg.output.dir) / "checkpoints"
        if resume_from is not None:
            for tag in integrity.roll_back(ckpt_root, resume_from):
                print(f"safebasin {command}: --resume-from {resume_from}: {tag} moved aside to "
                      f"{ckpt_root / integrity.SET_ASIDE}", flush=True)
        integrity.check_latest(ckpt_root)
    resolved = prepare_output(cfg, resume, getattr(args, "overwrite", False), topo)
    if resume and topo.node_rank == 0:
        # Before any rank starts: other nodes' ranks wait in the rendezvous meanwhile.
        if command == "train":  # a global batch this world size cannot keep: refused before any rank starts
            resume_accumulation(Path(cfg.output.dir) / "checkpoints", cfg.train.micro_batch_size,
                                cfg.train.gradient_accumulation_steps, topo.world_size)
        universal = convert_if_needed(Path(cfg.output.dir) / "checkpoints", topo.world_size)
        if universal is not None:
            print(f"safebasin {command}: the checkpoint was saved at another world size; resuming "
                  f"from its universal form {universal}")
    rank_logs = getattr(args, "rank_logs", None)
    # A rank log is written by the wrapper a launcher puts around each rank, so a one-rank job
    # that asks for one goes through the launcher too.
    if topo.in_process and rank_logs is None:
        from safebasin.launcher.entry import run_rank_command
        from safebasin.launcher.launch import single_process_env
        from safebasin.safety_core.runtime import apply_threads
        single_process_env(replace=True)
        job = load_config(resolved)
        apply_threads(job.runtime)
        return run_rank_command(command, job, resume)
    from safebasin.launcher.launch import launch
    # A built-in model is built into this node's cache here, once: ranks cannot build it
    # (transformers' save_pretrained writes nothing on a rank other than 0 once
    # torch.distributed is up, and concurrent ranks would race for the cache folder).
    cfg.model.resolved_path()
    print(f"safebasin {command}: {describe(topo)}", flush=True)
    code = launch(command, resolved, topo, ["--resume"] if resume else [], rank_log_dir=rank_logs)
    if code in (130, 143):
        raise Interrupted(code)
    if code != 0:
        logs = f"; rank logs in {Path(rank_logs).resolve()}" if rank_logs else ""
        raise JobFailed(f"the job failed on its ranks (exit {code}); their output is above{logs}", code)
    if topo.node_rank > 0:
        print(f"safebasin {command}: the ranks of node {topo.node_rank} finished; node 0 reports the result")
        raise SystemExit(0)
    return json.loads((Path(cfg.output.dir) / "results.json").read_text())


class JobFailed(RuntimeError):
    """The ranks failed; they printed why. Ends the command with their exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class Interrupted(BaseException):
    """SIGINT or SIGTERM: the command ends with 128 + the signal's number, as a shell reports."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code
