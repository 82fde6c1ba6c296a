"""Where the ranks of a job go: this process, several ranks on this node, one call per node
without ssh (given explicitly or read from a SLURM step), or a DeepSpeed hostfile over ssh.
Resolved from the command-line options before anything starts, so a bad combination fails
at once instead of as a hung rendezvous."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

DEFAULT_MASTER_PORT = 29500


class LaunchError(ValueError):
    pass


@dataclass(frozen=True)
class Topology:
    nproc: int = 1                     # ranks on each node
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    launcher: str = "deepspeed"        # or "torchrun"
    hostfile: str | None = None        # DeepSpeed runner over pdsh/ssh
    include: str = ""
    exclude: str = ""
    nproc_given: bool = False          # with a hostfile: override the slots
    source: str = "cli"                # "slurm" when read from the srun step

    @property
    def uses_runner(self) -> bool:
        """DeepSpeed's runner picks the hosts (and their slots) itself."""
        return bool(self.hostfile or self.include or self.exclude)

    @property
    def world_size(self) -> int:
        if self.uses_runner:
            return sum(len(slots) for slots in runner_resources(self).values())
        return self.nnodes * self.nproc

    @property
    def in_process(self) -> bool:
        return self.world_size == 1 and self.nnodes == 1 and not self.uses_runner and self.launcher == "deepspeed"


def runner_resources(topo: Topology) -> dict[str, list[int]]:
    """host -> slot ids the DeepSpeed runner will use, by its own hostfile and filter rules."""
    from deepspeed.launcher import runner
    try:
        pool = runner.fetch_hostfile(topo.hostfile) if topo.hostfile else None
    except ValueError as e:
        raise LaunchError(f"--hostfile {topo.hostfile}: {e}") from None
    if topo.hostfile and not pool:
        raise LaunchError(f"--hostfile {topo.hostfile}: no such file")
    if not pool:
        # Filters without a hostfile select devices of this node, as in DeepSpeed.
        from deepspeed.accelerator import get_accelerator
        pool = {"localhost": get_accelerator().device_count()}
    try:
        active = runner.parse_inclusion_exclusion(pool, topo.include, topo.exclude)
    except ValueError as e:
        raise LaunchError(f"--include/--exclude: {e}") from None
    if topo.nproc_given:
        active = {host: list(range(topo.nproc)) for host in active}
    return dict(active)


def resolve(args, env: Mapping[str, str] | None = None) -> Topology:
    """The topology asked for by the launch options of a job command (see cli._add_job_args)."""
    env = os.environ if env is None else env
    nproc = getattr(args, "nproc", None)
    given = {k: getattr(args, k, None) for k in ("nnodes", "node_rank", "master_addr", "master_port")}
    hostfile, include, exclude = (getattr(args, k, None) for k in ("hostfile", "include", "exclude"))
    launcher = getattr(args, "launcher", None) or "deepspeed"
    if nproc is not None and nproc < 1:
        raise LaunchError("--nproc must be at least 1")

    if hostfile or include or exclude:
        per_node = [f"--{k.replace('_', '-')}" for k in ("nnodes", "node_rank") if given[k] is not None]
        if per_node:
            raise LaunchError(f"{' and '.join(per_node)} start one launch per node without ssh; "
                              f"--hostfile/--include/--exclude let DeepSpeed start all nodes over ssh: pick one")
        if launcher != "deepspeed":
            raise LaunchError("--hostfile/--include/--exclude go through the DeepSpeed runner; with "
                              "--launcher torchrun run one launch per node (--nnodes/--node-rank)")
        if nproc is not None and (include or exclude):
            raise LaunchError("--nproc cannot be combined with --include/--exclude (DeepSpeed's rule): "
                              "name the slots in the filter instead")
        topo = Topology(nproc=nproc or 1, nproc_given=nproc is not None, hostfile=hostfile,
                        include=include or "", exclude=exclude or "", master_addr=given["master_addr"],
                        master_port=given["master_port"])
        if topo.world_size < 1:
            raise LaunchError("the hostfile and filters leave no slot to run on")
        return topo

    fields = {k: v for k, v in given.items() if v is not None}
    source = "cli"
    if given["nnodes"] is None and given["node_rank"] is None:
        from safebasin.launcher import slurm
        try:
            layout = slurm.step_layout(env)
        except ValueError as e:
            raise LaunchError(str(e)) from None
        if layout is not None:
            source = "slurm"
            if nproc is None:
                nproc = layout.pop("nproc", None)
            layout.pop("nproc", None)
            fields = {**layout, **fields}
    nnodes = fields.get("nnodes", 1)
    node_rank = fields.get("node_rank", 0)
    if nnodes < 1 or not 0 <= node_rank < nnodes:
        raise LaunchError(f"--node-rank must lie in [0, --nnodes - 1]; got node rank {node_rank} of {nnodes}")
    if nnodes > 1 and not fields.get("master_addr"):
        raise LaunchError("--nnodes > 1 needs --master-addr: the address of node rank 0, reachable from "
                          "every node (the same value and --master-port on all of them)")
    if nnodes > 1 and "master_port" not in fields:
        fields["master_port"] = DEFAULT_MASTER_PORT
    return Topology(nproc=nproc or 1, nnodes=nnodes, node_rank=node_rank,
                    master_addr=fields.get("master_addr"), master_port=fields.get("master_port"),
                    launcher=launcher, source=source)


def add_launch_args(p) -> None:
    """The launch options every job command takes (resolved by `resolve`)."""
    g = p.add_argument_group("launch (several ranks or nodes; see docs/multinode.md)")
    g.add_argument("--nproc", type=int, default=None,
                   help="ranks per node (default 1; with --hostfile its slots; in an srun step SLURM_GPUS_ON_NODE)")
    g.add_argument("--launcher", choices=["deepspeed", "torchrun"], default="deepspeed",
                   help="what starts the ranks of a node (default deepspeed)")
    g.add_argument("--hostfile", default=None,
                   help="DeepSpeed hostfile (`host slots=N` lines): start every host over pdsh/ssh from here")
    g.add_argument("--include", default=None, help="DeepSpeed host/slot filter, e.g. 'worker-0@worker-1:0,2'")
    g.add_argument("--exclude", default=None, help="DeepSpeed host/slot filter, e.g. 'worker-1:0'")
    g.add_argument("--nnodes", type=int, default=None,
                   help="nodes of a per-node launch without ssh: run this same command once on every node")
    g.add_argument("--node-rank", type=int, default=None, help="this node's index in [0, --nnodes - 1]")
    g.add_argument("--master-addr", default=None, help="address of node rank 0, reachable from every node")
    g.add_argument("--master-port", type=int, default=None,
                   help=f"rendezvous port on node rank 0 (default {DEFAULT_MASTER_PORT} with --nnodes > 1, "
                   f"else a free port)")
    g.add_argument("--rank-logs", default=None, metavar="DIR",
                   help="also write each rank's output to DIR/rankR.log (on the node that runs it)")


def describe(topo: Topology) -> str:
    if topo.uses_runner:
        return f"{topo.world_size} ranks on the hosts of {topo.hostfile or 'localhost'} (DeepSpeed runner)"
    where = f"node {topo.node_rank} of {topo.nnodes}, " if topo.nnodes > 1 else ""
    master = f", master {topo.master_addr}:{topo.master_port}" if topo.nnodes > 1 else ""
    origin = " (from the SLURM step)" if topo.source == "slurm" else ""
    return f"{where}{topo.nproc} rank(s) per node, world size {topo.world_size}, {topo.launcher}{master}{origin}"
