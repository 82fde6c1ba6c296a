"""Checkpoint integrity: what each checkpoint's files were when written, checked before a resume
loads them, and the way back to an older checkpoint when the newest is damaged.

Every rank hashes the files of its own rank right after DeepSpeed wrote them (in parallel, so a
large checkpoint costs one shard's read per rank); rank 0 writes the sizes and sha256 of all of
them to `stepN/safebasin_manifest.json` before `latest` names the tag. A resume (on node 0,
before any rank starts) checks the tag `latest` names against its manifest: a missing,
truncated or altered file is refused naming the file and the intact checkpoints, and
`--resume-from TAG` continues from one of those, moving the newer tags aside (nothing deleted).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path

from safebasin.safety_core.train.checkpoints import CheckpointError, latest_tag

MANIFEST = "safebasin_manifest.json"
SET_ASIDE = "set-aside"  # not step*: pruning and tag listings never see what was moved here
_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_")


def _owner(name: str) -> int:
    """The rank that writes a DeepSpeed checkpoint file: ZeRO shards carry their data-parallel
    rank in the name (zero_pp_rank_R_...), the rest (mp_rank_00_model_states.pt) is rank 0's."""
    m = _RANK_FILE.search(name)
    return int(m.group(1)) if m else 0


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def rank_digests(tag_dir: Path, rank: int) -> dict[str, dict]:
    """{file name: {bytes, sha256}} of the files of `tag_dir` that `rank` wrote."""
    return {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(Path(tag_dir).iterdir())
            if p.is_file() and p.name != MANIFEST and _owner(p.name) == rank}


def write_manifest(tag_dir: Path, files: dict[str, dict]) -> None:
    tmp = Path(tag_dir) / f".{MANIFEST}.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps({"files": files}, indent=1, sort_keys=True))
        os.replace(tmp, Path(tag_dir) / MANIFEST)
    finally:
        tmp.unlink(missing_ok=True)


def problems(tag_dir: Path) -> list[str] | None:
    """What is wrong with a checkpoint's files ([] when intact), None when it has no manifest
    (written before manifests existed, or a save that never finished)."""
    tag_dir = Path(tag_dir)
    manifest = tag_dir / MANIFEST
    if not manifest.is_file():
        return None
    found = []
    for name, want in sorted(json.loads(manifest.read_text())["files"].items()):
        path = tag_dir / name
        if not path.is_file():
            found.append(f"{name} is missing")
        elif (size := path.stat().st_size) != want["bytes"]:
            found.append(f"{name} has {size} bytes, {want['bytes']} were written (truncated or overwritten)")
        elif _sha256(path) != want["sha256"]:
            found.append(f"{name} has the size it was written with but other bytes (sha256 differs: corrupt)")
    return found


def step_tags(ckpt_root: Path) -> list[str]:
    """The checkpoint tags under ckpt_root, oldest first."""
    dirs = [p for p in Path(ckpt_root).glob("step*") if p.is_dir() and p.name[4:].isdigit()]
    return [p.name for p in sorted(dirs, key=lambda p: int(p.name[4:]))]


def intact_tags(ckpt_root: Path) -> list[str]:
    """Tags whose manifest matches their files, newest first."""
    return [t for t in reversed(step_tags(ckpt_root)) if problems(Path(ckpt_root) / t) == []]


def check_latest(ckpt_root: Path) -> None:
    """Refuse to resume from a damaged newest checkpoint, naming its bad files and the way on."""
    tag = latest_tag(ckpt_root)
    if tag is None:
        return
    found = problems(Path(ckpt_root) / tag)
    if found:
        raise CheckpointError(damaged_message(ckpt_root, tag, found))


def damaged_message(ckpt_root: Path, tag: str, found: list[str]) -> str:
    older = [t for t in intact_tags(ckpt_root) if int(t[4:]) < int(tag[4:])]
    way = (f"the newest intact checkpoint is {older[0]}: --resume-from {older[0]} continues from it "
           f"(moving {tag} aside to {Path(ckpt_root) / SET_ASIDE}, nothing is deleted)" if older
           else "no older intact checkpoint is left: start over with --overwrite (the folder is moved aside)")
    return f"checkpoint {tag} in {ckpt_root} is damaged and is not loaded: {'; '.join(found)}. {way}"


def roll_back(ckpt_root: Path, tag: str) -> list[str]:
    """Make `tag` the checkpoint a resume loads: check it, move every newer tag aside to
    SET_ASIDE/TAG-TIME, then point `latest` at it (atomically). Returns the tags moved aside."""
    ckpt_root = Path(ckpt_root)
    tags = step_tags(ckpt_root)
    if tag not in tags:
        raise CheckpointError(f"--resume-from {tag}: no such checkpoint in {ckpt_root} (it holds: "
                              f"{', '.join(tags) or 'none'})")
    found = problems(ckpt_root / tag)
    if found:
        raise CheckpointError(damaged_message(ckpt_root, tag, found))
    newer = [t for t in tags if int(t[4:]) > int(tag[4:])]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for t in newer:
        (ckpt_root / SET_ASIDE).mkdir(exist_ok=True)
        os.replace(ckpt_root / t, ckpt_root / SET_ASIDE / f"{t}-{stamp}")
    tmp = ckpt_root / f".latest.{os.getpid()}.tmp"
    tmp.write_text(tag)
    os.replace(tmp, ckpt_root / "latest")
    return newer
