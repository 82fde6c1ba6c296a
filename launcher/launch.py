"""Starting the ranks of a job: in this process for one rank, through the DeepSpeed launcher
for several on one node (gloo with DS_ACCELERATOR=cpu on CPU, NCCL on GPU)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_env() -> None:
    """The variables torch.distributed reads, for a job that runs as the only rank."""
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def on_cpu() -> bool:
    import torch
    return os.environ.get("DS_ACCELERATOR") == "cpu" or not torch.cuda.is_available()


def launch_local(command: str, config_path: Path, nproc: int, extra: list[str]) -> int:
    """Run `safebasin.launcher.entry COMMAND CONFIG` on `nproc` local ranks; returns the exit code."""
    env = dict(os.environ)
    if on_cpu():
        # The CPU accelerator counts one device per NUMA node unless told the local size.
        env.update(DS_ACCELERATOR="cpu", LOCAL_SIZE=str(nproc))
    cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "--module", "safebasin.launcher.entry", command, str(config_path), *extra]
    return subprocess.call(cmd, env=env)
