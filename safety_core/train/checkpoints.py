"""Resuming DeepSpeed checkpoints on a different number of ranks.

A ZeRO checkpoint holds one optimizer shard per data-parallel rank, so it loads only at the
world size that wrote it. DeepSpeed's universal format (one folder per parameter) loads at any
world size; `convert_if_needed` produces it from the newest checkpoint before the ranks start,
and the trainer loads it with the engine's `checkpoint.load_universal` option.

Layout under OUTPUT/checkpoints: `latest` names the newest tag (stepN); a conversion writes
`universal-stepN` and `latest_universal` (the file the engine reads in universal mode).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

UNIVERSAL_PREFIX = "universal-"


class CheckpointError(RuntimeError):
    pass


def latest_tag(ckpt_root: Path) -> str | None:
    latest = Path(ckpt_root) / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def _model_states_file(tag_dir: Path) -> Path:
    # ZeRO 0-2 write mp_rank_00_model_states.pt; ZeRO-3 one zero_pp_rank_R_... file per rank.
    files = sorted(tag_dir.glob("*model_states.pt"))
    if not files:
        raise CheckpointError(f"{tag_dir} holds no *model_states.pt: not a DeepSpeed checkpoint, or "
                              f"its shards lie on another node's disk")
    return files[0]


def is_zero_sharded(tag_dir: Path) -> bool:
    """True when the optimizer state is split per rank (ZeRO 1-3); ZeRO-0 state is replicated."""
    return any(Path(tag_dir).glob("*optim_states.pt"))


def _states(ckpt_root: Path, tag: str) -> dict:
    import torch
    # mmap: only the small pickled header is read, not the tensors.
    return torch.load(_model_states_file(Path(ckpt_root) / tag), map_location="cpu", mmap=True,
                      weights_only=False)


def saved_world_size(ckpt_root: Path, tag: str | None = None) -> int | None:
    """The world size that wrote the newest checkpoint (or `tag`), None when there is none."""
    tag = tag or latest_tag(ckpt_root)
    if tag is None:
        return None
    state = _states(ckpt_root, tag)
    ours = state.get("safebasin") or {}
    # Checkpoints written before the trainer recorded it still carry DeepSpeed's own count.
    return int(ours.get("world_size") or state["dp_world_size"])


def saved_global_batch(ckpt_root: Path) -> int | None:
    """Examples per optimizer step of the run that wrote the newest checkpoint, None when there
    is no checkpoint (or an old one that recorded neither it nor its DeepSpeed config)."""
    tag = latest_tag(ckpt_root)
    if tag is None:
        return None
    state = _states(ckpt_root, tag)
    ours = state.get("safebasin") or {}
    value = ours.get("global_batch") or (state.get("ds_config") or {}).get("train_batch_size")
    return int(value) if value else None


def kept_accumulation(global_batch: int, micro_batch: int, world: int) -> int | None:
    """The gradient accumulation that makes micro_batch x it x world equal global_batch, or None."""
    per_pass = micro_batch * world
    return global_batch // per_pass if global_batch % per_pass == 0 else None


def accumulation_fix(global_batch: int, world: int) -> str:
    """What a resume at `world` ranks can change to keep `global_batch`."""
    fits = [m for m in range(1, global_batch + 1) if global_batch % (m * world) == 0]
    return (f"set train.micro_batch_size to one of {fits}" if fits
            else f"resume on a number of ranks that divides {global_batch}")


def resume_accumulation(ckpt_root: Path, micro_batch: int, grad_accum: int, world: int) -> tuple[int, str | None]:
    """The gradient accumulation that keeps the checkpoint's global batch at this job's micro
    batch and world size, and a note saying what changed (None when nothing did).

    The global batch is part of the run's meaning: the data order (examples [t G, (t+1) G) at
    step t), the learning-rate schedule (steps of G examples) and the gradient noise all follow
    it. So a resume on another world size keeps it, adjusting the accumulation when G divides
    by micro batch x ranks, and refuses otherwise (launcher/outputs.plan_problems refuses the
    same before any rank starts)."""
    saved = saved_global_batch(ckpt_root)
    if saved is None or micro_batch * grad_accum * world == saved:
        return grad_accum, None
    accum = kept_accumulation(saved, micro_batch, world)
    if accum is None:
        raise CheckpointError(
            f"the checkpoint in {ckpt_root} was trained with a global batch of {saved} examples per step; "
            f"this job has train.micro_batch_size {micro_batch} x {world} ranks = {micro_batch * world} "
            f"examples per accumulation step, and {saved} is no multiple of it, so no "
            f"train.gradient_accumulation_steps keeps the run's data order and schedule: "
            f"{accumulation_fix(saved, world)}")
    return accum, (f"train.gradient_accumulation_steps {grad_accum} -> {accum} keeps the checkpoint's "
                   f"global batch of {saved} examples per step ({micro_batch} x {accum} x {world} ranks)")


def universal_needed(ckpt_root: Path, world_size: int) -> bool:
    tag = latest_tag(ckpt_root)
    if tag is None or not is_zero_sharded(Path(ckpt_root) / tag):
        return False
    return saved_world_size(ckpt_root, tag) != world_size


def universal_ready(ckpt_root: Path) -> bool:
    """True when `latest_universal` points at a finished conversion of the newest tag."""
    tag = latest_tag(ckpt_root)
    pointer = Path(ckpt_root) / "latest_universal"
    return (tag is not None and pointer.is_file() and pointer.read_text().strip() == UNIVERSAL_PREFIX + tag
            and (Path(ckpt_root) / (UNIVERSAL_PREFIX + tag) / "zero").is_dir())


def convert_if_needed(ckpt_root: Path, world_size: int, *, workers: int = 2) -> Path | None:
    """Write the universal form of the newest checkpoint when it was saved at another world size;
    returns its folder, or None when the checkpoint loads as it is."""
    ckpt_root = Path(ckpt_root)
    if not universal_needed(ckpt_root, world_size):
        return None
    tag = latest_tag(ckpt_root)
    target = ckpt_root / (UNIVERSAL_PREFIX + tag)
    if universal_ready(ckpt_root):
        return target
    for stale in ckpt_root.glob(UNIVERSAL_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    (ckpt_root / "latest_universal").unlink(missing_ok=True)
    # A child process: the converter starts its own worker pools and prints a lot.
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
           "--input_folder", str(ckpt_root / tag), "--output_folder", str(target),
           "--num_extract_workers", str(workers), "--num_merge_workers", str(max(1, workers // 2)),
           "--inject_missing_state"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0 or not universal_ready(ckpt_root):
        shutil.rmtree(target, ignore_errors=True)
        raise CheckpointError(f"converting {ckpt_root / tag} to a universal checkpoint failed "
                              f"(exit {res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    return target
