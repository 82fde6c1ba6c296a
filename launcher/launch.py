"""Starting the ranks of a job (gloo with DS_ACCELERATOR=cpu on CPU, NCCL on GPU):

- one rank: in this process;
- several ranks on one node, or one call per node without ssh: DeepSpeed's per-node launcher
  (`deepspeed.launcher.launch`) with the world layout of all nodes and this node's rank, which
  is what DeepSpeed's own runner does in its --no_ssh mode;
- a hostfile: DeepSpeed's runner, which starts every node over pdsh/ssh;
- `--launcher torchrun`: torch.distributed.run with the same layout.

Each launcher starts `safebasin.launcher.ranklog` per rank (the entry, output prefixed by
rank) and ends the node's other ranks when one fails; ranks on other nodes fail at their next
collective, or at the collective timeout when a node hangs instead of dying.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from safebasin.launcher.topology import Topology

RANK_MODULE = "safebasin.launcher.ranklog"
# What remote ranks need from the launching shell: tracking, our own switches, the accelerator,
# the Hugging Face caches and token, communication tuning. Not PYTHONPATH: the runner exports
# it itself with the launching directory in front, and a line of ours would replace that.
REMOTE_ENV_PREFIXES = ("MLFLOW_", "SAFEBASIN_", "DS_ACCELERATOR", "DEEPSPEED_", "HF_", "HUGGING_FACE_",
                       "TRANSFORMERS_", "TOKENIZERS_", "NCCL_", "TORCH_", "GLOO_", "CUDA_HOME",
                       "OMP_NUM_THREADS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_env(replace: bool = False) -> None:
    """The variables torch.distributed reads, for a job that runs as the only rank. A rank
    started by a launcher keeps what the launcher set; `replace` is for a job run in this
    process, where inherited values (say MASTER_PORT of an enclosing job that holds that port)
    would make the rendezvous fail."""
    import torch.distributed as dist
    put = os.environ.__setitem__ if replace else os.environ.setdefault
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1")):
        put(key, value)
    # An earlier in-process job's group is reused as it is (DeepSpeed skips its rendezvous).
    if "MASTER_PORT" not in os.environ or (replace and not dist.is_initialized()):
        os.environ["MASTER_PORT"] = str(free_port())


def on_cpu() -> bool:
    import torch
    return os.environ.get("DS_ACCELERATOR") == "cpu" or not torch.cuda.is_available()


def launch(command: str, config_path: Path, topo: Topology, extra: list[str], *,
           rank_log_dir: str | Path | None = None) -> int:
    """Start this node's share of the job's ranks (all of them with a hostfile) and wait; returns
    the launcher's exit code, non-zero when any rank failed, or 128 + N when this process got
    signal N (SIGINT, SIGTERM) and passed it on."""
    env = dict(os.environ)
    if on_cpu():
        # The CPU accelerator counts one device per NUMA node unless told the local size.
        env.update(DS_ACCELERATOR="cpu", LOCAL_SIZE=str(topo.nproc))
        if not topo.uses_runner:
            # Each rank would otherwise start a thread per core: N ranks oversubscribe the node N-fold.
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // topo.nproc)))
    if rank_log_dir is not None:
        env["SAFEBASIN_RANK_LOG_DIR"] = str(Path(rank_log_dir).resolve())
    rank_args = [command, str(Path(config_path).resolve()), *extra]
    if topo.uses_runner:
        env["DS_ENV_FILE"] = str(write_remote_env(Path(config_path).parent / ".deepspeed_env", env))
        cmd = runner_command(topo, rank_args)
    elif topo.launcher == "torchrun":
        cmd = torchrun_command(topo, rank_args)
    else:
        cmd = per_node_command(topo, rank_args)
    proc = subprocess.Popen(cmd, env=env)
    received: list[int] = []

    def forward(signum, _frame):
        received.append(signum)
        proc.send_signal(signum)

    # A scheduler or a user stopping this command must stop the ranks too, not orphan them; the
    # command then reports the signal (128 + N, as a shell does) rather than the launcher's 1.
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = proc.wait()
        return 128 + received[0] if received else code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _master(topo: Topology) -> tuple[str, int]:
    if topo.nnodes == 1:
        return topo.master_addr or "127.0.0.1", topo.master_port or free_port()
    return topo.master_addr, topo.master_port


def local_device_ids(nproc: int) -> list[int]:
    """This node's devices: the first `nproc` of CUDA_VISIBLE_DEVICES when set (the launcher
    rewrites that variable per node from these ids), else 0..nproc-1."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    ids = [int(i) for i in visible.split(",") if i.strip().isdigit()] if visible and not on_cpu() else []
    if not ids:
        return list(range(nproc))
    if len(ids) < nproc:
        raise ValueError(f"--nproc {nproc} but CUDA_VISIBLE_DEVICES lists {len(ids)} devices")
    return ids[:nproc]


def per_node_command(topo: Topology, rank_args: list[str]) -> list[str]:
    import base64
    import json
    # The per-node launcher derives global ranks from the layout of every node; names are only
    # keys here (no ssh), and all nodes run the same number of ranks.
    ids = local_device_ids(topo.nproc)
    world_info = {f"node{i}": ids for i in range(topo.nnodes)}
    encoded = base64.urlsafe_b64encode(json.dumps(world_info).encode()).decode()
    addr, port = _master(topo)
    return [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={encoded}",
            f"--node_rank={topo.node_rank}", f"--master_addr={addr}", f"--master_port={port}",
            "--module", RANK_MODULE, *rank_args]


def torchrun_command(topo: Topology, rank_args: list[str]) -> list[str]:
    addr, port = _master(topo)
    # No restarts: a failed rank fails the job, and --resume continues it from the checkpoint.
    return [sys.executable, "-u", "-m", "torch.distributed.run", f"--nnodes={topo.nnodes}",
            f"--node-rank={topo.node_rank}", f"--nproc-per-node={topo.nproc}", f"--master-addr={addr}",
            f"--master-port={port}", "--max-restarts=0", "--monitor-interval=1", "--module", RANK_MODULE,
            *rank_args]


def runner_command(topo: Topology, rank_args: list[str]) -> list[str]:
    cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.runner"]
    if topo.hostfile:
        cmd += ["--hostfile", str(Path(topo.hostfile).resolve())]
    if topo.include:
        cmd += ["--include", topo.include]
    if topo.exclude:
        cmd += ["--exclude", topo.exclude]
    if topo.nproc_given:
        cmd += ["--num_gpus", str(topo.nproc)]
    if topo.master_addr:
        cmd += ["--master_addr", topo.master_addr]
    cmd += ["--master_port", str(topo.master_port or free_port())]
    return [*cmd, "--module", RANK_MODULE, *rank_args]


def write_remote_env(path: Path, env: dict[str, str]) -> Path:
    """The variables remote ranks need, in DeepSpeed's .deepspeed_env format (the pdsh runner
    exports them on every host). Lines of the user's ~/.deepspeed_env and ./.deepspeed_env
    follow and so win, as they would without this file. Private: it may hold tokens."""
    lines = []
    for key in sorted(env):
        value = env[key]
        if key == "DS_ENV_FILE" or not key.startswith(REMOTE_ENV_PREFIXES):
            continue
        if any(c in value for c in '\n"$`\\'):
            # The runner pastes values into a shell command in double quotes, unescaped.
            print(f"safebasin: not forwarding {key} to remote ranks: its value holds quotes, $ or newlines",
                  file=sys.stderr)
            continue
        lines.append(f"{key}={value}")
    for user_file in (Path.home() / ".deepspeed_env", Path(".deepspeed_env")):
        if user_file.is_file() and user_file.resolve() != path.resolve():
            lines += [line for line in user_file.read_text().splitlines() if "=" in line]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(line + "\n" for line in lines))
    return path.resolve()
