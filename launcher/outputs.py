"""Output folders: never written where an input lies, never replaced silently, and resumed only
with the plan they started with. Everything here runs on the launching process before any rank
starts, and reads only small files (config.yaml, the checkpoint's header).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from safebasin.launcher.config import ConfigError, JobConfig, load_config

# What a job leaves in its output folder that is worth keeping: a re-run into a folder holding
# any of these refuses unless told --resume or --overwrite. (config.yaml and mlflow_run.json
# alone mean a job that died before its first step: nothing to lose, and a new job gets a new
# MLflow run anyway, see Tracker.)
RESULT_NAMES = ("results.json", "checkpoints", "metrics.jsonl", "model", "adapter", "eval_results.json",
                "eval_records.jsonl", "demo_manifest.json")
# Keys that fix a training job's plan (its length, learning-rate schedule and data order): a
# resume that changed one would continue another job than the one its checkpoint belongs to.
PLAN_KEYS = ("train.max_steps", "train.epochs", "train.lr", "train.schedule", "train.warmup_steps",
             "train.weight_decay", "train.seed", "data.num_examples", "data.seed")


def real(path: str | Path) -> Path:
    """The path with ~, `..` and every symlink resolved (also for a path not made yet)."""
    return Path(os.path.expanduser(str(path))).resolve()


def overlap(out: str | Path, inp: str | Path) -> str | None:
    """How an output path and an existing input path relate, or None when apart."""
    a, b = real(out), real(inp)
    if a == b:
        return "is"
    if b in a.parents:
        return "lies inside"
    if a in b.parents:
        return "holds"
    return None


def overlap_problems(out_label: str, out: str | Path, inputs: list[tuple[str, str]]) -> list[str]:
    """One line per input that the output path is, lies inside, or holds."""
    problems = []
    for label, value in inputs:
        if not value or not os.path.lexists(os.path.expanduser(str(value))):
            continue
        how = overlap(out, value)
        if how is not None:
            where = "" if str(real(value)) == str(value) else f" ({real(value)})"
            problems.append(f"{out_label} {out} {how} the input {label} {value}{where}: a command never "
                            f"writes where its inputs are; choose another {out_label}")
    return problems


def writable_problem(label: str, out: str | Path) -> str | None:
    """Why the folder cannot be made or written, or None. Probed by creating a file in it (or in
    its nearest existing parent): permission bits say nothing for root or read-only mounts."""
    out = Path(os.path.expanduser(str(out)))
    probe_dir = out
    while not probe_dir.exists():
        if probe_dir.parent == probe_dir:
            break
        probe_dir = probe_dir.parent
    if probe_dir == out and not out.is_dir():
        return f"{label} {out} exists and is not a folder"
    if not probe_dir.is_dir():
        return f"{label} {out}: its parent {probe_dir} is a file, not a folder"
    probe = probe_dir / f".safebasin-write-probe.{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        return f"{label} {out}: cannot write in {probe_dir} ({e.strerror})"
    return None


def previous_results(out: Path) -> list[str]:
    return [name for name in RESULT_NAMES if (out / name).exists()]


def local_store(uri: str) -> Path | None:
    """The file or folder of a local MLflow store (sqlite:///PATH, file:PATH or a plain path)."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):])
    if uri.startswith("file:"):
        from urllib.parse import urlparse
        return Path(urlparse(uri).path)
    return None if "://" in uri else Path(uri)


def move_aside(out: Path, keep: list[tuple[str, str]]) -> Path:
    """--overwrite: the previous result moves to OUT.replaced-TIME, never deleted. Refused when
    the folder holds something the job itself goes on using (`keep`: the current directory, the
    MLflow store)."""
    problems = [f"--overwrite would move {label} {value} away with {out}; choose another output folder"
                for label, value in keep if value and os.path.lexists(value) and overlap(out, value) in ("is", "holds")]
    if problems:
        raise ConfigError(problems)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest, n = out.with_name(f"{out.name}.replaced-{stamp}"), 1
    while dest.exists():
        n += 1
        dest = out.with_name(f"{out.name}.replaced-{stamp}-{n}")
    os.rename(out, dest)
    return dest


def refuse_previous(out: Path, label: str, held: list[str], can_resume: bool) -> ConfigError:
    resume = "pass --resume to continue it, " if can_resume and "checkpoints" in held else ""
    return ConfigError([f"{label} {out} holds a previous job's results ({', '.join(held)}): {resume}pass "
                        f"--overwrite to move them aside to {out.name}.replaced-<time> and start over, or "
                        f"choose another {label}"])


def _value(cfg: JobConfig, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part, None) if node is not None else None
    return node


def plan_problems(old: JobConfig, new: JobConfig, old_world: int | None, new_world: int) -> list[str]:
    """The plan keys a resume changed, with both values. The batch is compared as the global
    batch (micro x accumulation x ranks): the trainer keeps it by setting the accumulation
    (checkpoints.resume_accumulation), so only a global batch that no accumulation can give at
    the new micro batch and world size is a problem."""
    from safebasin.safety_core.train.checkpoints import accumulation_fix, kept_accumulation
    problems = [f"{key}: {_value(old, key)!r} when the job started, {_value(new, key)!r} now"
                for key in PLAN_KEYS if _value(old, key) != _value(new, key)]
    if old.train is not None and new.train is not None and old_world is not None:
        before = old.train.micro_batch_size * old.train.gradient_accumulation_steps * old_world
        after = new.train.micro_batch_size * new.train.gradient_accumulation_steps * new_world
        if before != after and kept_accumulation(before, new.train.micro_batch_size, new_world) is None:
            problems.append(
                f"global batch (train.micro_batch_size x train.gradient_accumulation_steps x ranks): "
                f"{old.train.micro_batch_size} x {old.train.gradient_accumulation_steps} x {old_world} = "
                f"{before} when the job started, {new.train.micro_batch_size} x "
                f"{new.train.gradient_accumulation_steps} x {new_world} = {after} now, and no "
                f"train.gradient_accumulation_steps keeps {before} with {new.train.micro_batch_size} x "
                f"{new_world} ranks: {accumulation_fix(before, new_world)}")
    return [f"--resume keeps the job's plan, but {p}; resume with the old value, or start a new job "
            f"(another output.dir, or --overwrite)" for p in problems]


def check_resume_plan(cfg: JobConfig, out: Path, world_size: int) -> None:
    from safebasin.safety_core.train.checkpoints import saved_world_size
    previous = out / "config.yaml"
    if not previous.is_file():
        return  # nothing recorded to compare with (a checkpoint copied in by hand)
    old = load_config(previous)
    problems = plan_problems(old, cfg, saved_world_size(out / "checkpoints"), world_size)
    if problems:
        raise ConfigError(problems)


def write_results(out: Path, summary: dict) -> None:
    """results.json marks a finished job: written aside and renamed, so a job stopped while
    writing it never leaves a half file that reads as finished."""
    tmp = out / f".results.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    os.replace(tmp, out / "results.json")


def check_combine(out: Path, combine: list, resume: bool, seeds) -> None:
    """--combine reads its folders and writes --out: no --resume or --seeds with it, and --out
    may not hold or lie inside a folder it reads."""
    if resume or seeds:
        raise ConfigError(["--combine takes the seeds from its folders: no --resume or --seeds with it"])
    problems = overlap_problems("--out", out, [("--combine folder", f) for f in combine])
    if problems:
        raise ConfigError(problems)
