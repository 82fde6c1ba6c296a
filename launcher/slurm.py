"""SLURM: reading the node layout of an srun step, and writing sbatch scripts that start one
`safebasin` per node (which then starts the node's ranks without ssh)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Mapping


def expand_nodelist(text: str) -> list[str]:
    """Host names of a SLURM node list such as `gpu[01-03,07],login1`, keeping zero padding.
    Covers the bracket forms SLURM prints; `scontrol show hostnames` is preferred when present."""
    hosts: list[str] = []
    for item in _split_top_level(text.strip()):
        hosts.extend(_expand_item(item))
    return hosts


def _split_top_level(text: str) -> list[str]:
    items, depth, current = [], 0, ""
    for ch in text:
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
            continue
        depth += (ch == "[") - (ch == "]")
        current += ch
    items.append(current)
    return [i for i in items if i]


def _expand_item(item: str) -> list[str]:
    m = re.match(r"^([^\[]*)\[([^\]]+)\](.*)$", item)
    if m is None:
        return [item]
    head, ranges, tail = m.groups()
    out = []
    for part in ranges.split(","):
        lo, _, hi = part.partition("-")
        if not hi:
            values = [lo]
        else:
            width = len(lo)
            values = [f"{i:0{width}d}" for i in range(int(lo), int(hi) + 1)]
        for v in values:
            out.extend(_expand_item(head + v + tail))  # a later bracket group, e.g. r[1-2]n[1-4]
    return out


def hostnames(nodelist: str) -> list[str]:
    if shutil.which("scontrol"):
        res = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        if res.returncode == 0 and res.stdout.split():
            return res.stdout.split()
    return expand_nodelist(nodelist)


def default_port(job_id: str | int) -> int:
    """A port every node of a job computes alike, and that differs between jobs sharing nodes."""
    return 20000 + int(job_id) % 20000


def step_layout(env: Mapping[str, str]) -> dict | None:
    """nnodes, node_rank, master_addr, master_port and (when SLURM knows it) nproc for this
    process, when it is one task of a multi-node srun step; None otherwise."""
    if "SLURM_JOB_ID" not in env or "SLURM_STEP_NUM_NODES" not in env:
        return None  # not under SLURM, or the batch script itself rather than an srun step
    nnodes = int(env["SLURM_STEP_NUM_NODES"])
    if nnodes <= 1:
        return None
    ntasks = int(env.get("SLURM_STEP_NUM_TASKS", nnodes))
    if ntasks != nnodes:
        raise ValueError(f"this srun step runs {ntasks} tasks on {nnodes} nodes: safebasin starts the "
                         f"ranks of a node itself, so run one task per node (srun --ntasks-per-node=1)")
    nodelist = env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]
    layout = {"nnodes": nnodes, "node_rank": int(env["SLURM_PROCID"]),
              "master_addr": env.get("MASTER_ADDR") or hostnames(nodelist)[0],
              "master_port": int(env.get("MASTER_PORT") or default_port(env["SLURM_JOB_ID"]))}
    gpus = env.get("SLURM_GPUS_ON_NODE")
    if gpus and gpus.isdigit() and int(gpus) > 0:
        layout["nproc"] = int(gpus)
    return layout


def sbatch_script(command: str, config: str | Path, overrides: list[str], *, nodes: int, gpus_per_node: int,
                  partition: str | None = None, time: str | None = None, account: str | None = None,
                  job_name: str = "safebasin", cpus_per_task: int | None = None,
                  launch_args: list[str] = (), workdir: str | Path | None = None) -> str:
    """An sbatch script running `safebasin COMMAND CONFIG` once per node with the per-node
    launch options taken from the SLURM variables of each task."""
    # The console script of this environment, so every node runs the same installation.
    beside = Path(sys.executable).with_name("safebasin")
    exe = str(beside) if beside.exists() else shutil.which("safebasin") or "safebasin"
    directives = [f"--job-name={job_name}", f"--nodes={nodes}", "--ntasks-per-node=1",
                  f"--gpus-per-node={gpus_per_node}", f"--output={job_name}-%j.out"]
    for flag, value in (("partition", partition), ("time", time), ("account", account),
                        ("cpus-per-task", cpus_per_task)):
        if value is not None:
            directives.append(f"--{flag}={value}")
    fixed = shlex.join([exe, command, str(Path(config).resolve()), *overrides, *launch_args,
                        "--nproc", str(gpus_per_node)])
    # Single quotes: each task expands these itself (the batch shell runs on the first node only).
    per_node = ('exec "$@" --nnodes "$SLURM_NNODES" --node-rank "$SLURM_PROCID" '
                '--master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"')
    lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives), "",
             "# Generated by `safebasin slurm`. One task per node; each starts its node's ranks",
             "# with the no-ssh per-node launch. A failing task ends the others (--kill-on-bad-exit);",
             "# resubmit with --resume to continue from the newest checkpoint.",
             "set -euo pipefail",
             f"cd {shlex.quote(str(Path(workdir or Path.cwd()).resolve()))}",
             'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
             'export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"',
             "srun --ntasks-per-node=1 --kill-on-bad-exit=1 \\",
             f"  bash -c '{per_node}' \\",
             f"  safebasin-node {fixed}",
             ""]
    return "\n".join(lines)
