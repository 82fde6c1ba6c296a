"""Process-group start-up and this rank's device, and rank helpers that fall back to a single
process when torch.distributed is not initialized, so code is written once and runs the same
on one CPU or many GPUs."""

from __future__ import annotations

import math
import os
import re
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from safebasin.safety_core.progress import track


def collective_timeout(timeout_minutes: float):
    """How long a rank waits in a collective (or the rendezvous) before failing: a dead or hung
    peer then ends the job instead of hanging it. SAFEBASIN_COLLECTIVE_TIMEOUT_S overrides the
    config in seconds, for tests and for jobs that want failures detected within seconds."""
    import datetime
    seconds = os.environ.get("SAFEBASIN_COLLECTIVE_TIMEOUT_S")
    if seconds:
        return datetime.timedelta(seconds=float(seconds))
    return datetime.timedelta(minutes=timeout_minutes)


class CollectiveTimeout(RuntimeError):
    """A collective waited past the collective timeout: a peer hung or vanished."""


_PROGRESS = "safebasin/progress/"


def report_progress(step: int) -> None:
    """Record the step this rank entered in the rendezvous store, which every rank reaches (it is
    served by rank 0's process, on a thread of its own): when a collective times out, the rank
    that notices names the ranks that are behind (explain_timeout). One small TCP write a step."""
    if not is_distributed() or dist.get_world_size() == 1:
        return
    import socket
    from torch.distributed.distributed_c10d import _get_default_store
    _get_default_store().set(f"{_PROGRESS}{dist.get_rank()}", f"{step} {socket.gethostname()}")


def explain_timeout(exc: BaseException, timeout) -> CollectiveTimeout | None:
    """The error to end a rank with when `exc` (or what caused it) is a collective timeout:
    it names the ranks whose last reported step is behind this rank's, and the timeout's keys.
    None for any other error."""
    seen, cause = [], exc
    while cause is not None and cause not in seen:
        seen.append(cause)
        cause = cause.__cause__ or cause.__context__
    # gloo: "Timed out waiting 30000ms for recv"; NCCL: "collective operation timeout". Both come
    # as RuntimeError (DistBackendError is one); a network TimeoutError elsewhere is an OSError.
    said = re.compile(r"timed out|operation timeout", re.IGNORECASE)
    if not any(isinstance(e, RuntimeError) and said.search(str(e)) for e in seen):
        return None
    if not is_distributed() or dist.get_world_size() == 1:
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    head = (f"rank {rank}: a collective waited past the collective timeout ({timeout.total_seconds():.0f} s: "
            f"deepspeed.timeout_minutes, or SAFEBASIN_COLLECTIVE_TIMEOUT_S in seconds), so the job ends")
    return CollectiveTimeout(f"{head}; {_who_is_behind(rank, world)}")


def _who_is_behind(rank: int, world: int) -> str:
    import datetime
    from torch.distributed.distributed_c10d import _get_default_store
    store = _get_default_store()
    store.set_timeout(datetime.timedelta(seconds=10))  # the store answers at once, or its host is gone
    try:
        steps = {r: store.get(f"{_PROGRESS}{r}").decode().split(" ", 1) if store.check([f"{_PROGRESS}{r}"])
                 else None for r in range(world)}
    except RuntimeError as e:  # the store lives in rank 0's process: gone when rank 0 is
        return f"the ranks' progress could not be read from the rendezvous store (rank 0's process): {e}"
    mine = int(steps[rank][0]) if steps[rank] else 0
    silent = [f"rank {r} (no step reported)" for r, s in steps.items() if s is None]
    behind = [f"rank {r} on {s[1]} (last entered step {s[0]})" for r, s in steps.items()
              if s is not None and int(s[0]) < mine]
    if silent or behind:
        return (f"{', '.join(silent + behind)} stopped answering while rank {rank} waited in step {mine}: look "
                f"at that rank's output and host (a hang, a deadlock, or a dead node)")
    return (f"every rank entered step {mine}: one of them hangs inside it (the ranks' output shows which "
            f"one did not finish its collective)")


def init_distributed(timeout_minutes: float) -> tuple[int, int]:
    import deepspeed
    from torch.distributed import distributed_c10d
    if not dist.is_initialized():
        timeout = collective_timeout(timeout_minutes)
        # DeepSpeed makes its data-parallel subgroups with new_group(ranks), which takes torch's
        # default timeout (30 min gloo, 10 min NCCL) rather than the job's: a hung peer would block
        # the gradient reductions that long whatever the config says.
        distributed_c10d.default_pg_timeout = timeout
        distributed_c10d.default_pg_nccl_timeout = timeout
        _skip_shared_memory_allreduce()
        rank_device()  # NCCL binds each rank to the current device at its first collective
        deepspeed.init_distributed(timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def _skip_shared_memory_allreduce() -> None:
    """Keep DeepSpeed from building and starting its shared-memory all-reduce op.

    On the CPU accelerator DeepSpeed JIT-compiles that op at every process-group start and each
    rank creates a 69 MB segment in /dev/shm that nothing unlinks: every job leaks that much RAM
    until reboot (300 test jobs filled 21 GB of a 24 GB machine), a segment left under a reused
    port is opened by the next job's peers, and a build killed midway leaves a lock file that
    hangs every later start. Only DeepSpeed's inference all-reduce uses the op; training
    collectives go through the process group (gloo) either way."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def uses_cpu() -> bool:
    """The rule every command follows: the CPU when DeepSpeed is told so or no GPU is visible."""
    return os.environ.get("DS_ACCELERATOR") == "cpu" or not torch.cuda.is_available()


def rank_device() -> torch.device:
    """This rank's device, cuda:LOCAL_RANK made the process's current device (so collectives,
    judges and anything else that takes "cuda" without an index land on this rank's GPU), or
    the CPU. Called before the first collective by every rank command."""
    if uses_cpu():
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if local >= torch.cuda.device_count():
        raise RuntimeError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} GPU(s) are visible "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): start "
                           f"at most that many ranks per node")
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def local_rank() -> int:
    """This rank's index on its node (LOCAL_RANK, which every launcher sets; the global rank
    without one): node-local files (caches under a home that nodes do not share) are written by
    local rank 0 of every node."""
    return int(os.environ.get("LOCAL_RANK", rank_world()[0]))


def is_main() -> bool:
    return rank_world()[0] == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shard(items: Sequence, rank: int | None = None, world: int | None = None) -> list:
    """This rank's items: every world-th one starting at rank (disjoint, covers everything)."""
    r, w = rank_world()
    rank = r if rank is None else rank
    world = w if world is None else world
    return list(items[rank::world])


def unshard(shards: Sequence[Sequence]) -> list:
    """Inverse of `shard`: interleave per-rank lists back into the original order."""
    out = []
    for i in range(max((len(s) for s in shards), default=0)):
        out.extend(s[i] for s in shards if i < len(s))
    return out


def all_gather_object(obj: Any) -> list:
    """[obj of rank 0, obj of rank 1, ...]; [obj] in a single process."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _comm_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo only CPU ones.
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum over ranks, in float64."""
    t = torch.tensor(list(values), dtype=torch.float64, device=_comm_device())
    if is_distributed():
        dist.all_reduce(t)
    return t.cpu().tolist()


def all_reduce_tensor_(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks of a tensor living anywhere (copied through the comm device)."""
    if not is_distributed():
        return t
    buf = t.detach().to(_comm_device(), copy=True)
    dist.all_reduce(buf)
    t.copy_(buf.to(t.device))
    return t


def is_zero3(model) -> bool:
    """True when parameters are ZeRO-3 partitioned, so forwards are collective across ranks."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def map_batches(fn: Callable[[Any], list], batches: Sequence, *, sync: bool = False,
                desc: str | None = None, progress: bool = True) -> list:
    """Run fn on whole batches, batch b on rank b % world, and return the concatenated per-item
    results in batch order on every rank.

    Sharding whole batches (not examples) keeps each batch's composition, and so its padding and
    numerics, the same whatever the world size: N ranks reproduce the 1-rank results exactly.
    With `sync` (ZeRO-3: every forward is collective) ranks with fewer batches repeat batch 0
    and drop the result, so all ranks run the same number of calls.
    """
    rank, world = rank_world()
    mine = list(range(rank, len(batches), world))
    steps = math.ceil(len(batches) / world) if sync else len(mine)
    done: dict[int, list] = {}
    for step in track(range(steps), desc or "batches", disable=not progress or rank != 0, leave=False):
        if step < len(mine):
            done[mine[step]] = list(fn(batches[mine[step]]))
        elif batches:
            fn(batches[0])
    merged: dict[int, list] = {}
    for part in all_gather_object(done):
        merged.update(part)
    return [item for b in range(len(batches)) for item in merged[b]]


def chunks(items: Sequence, size: int) -> list[list]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]
