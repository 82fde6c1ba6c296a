"""ZeRO-3 partition geometry, defined once for the anchor's sharded penalty and restoration's
sharded parameter space.

DeepSpeed flattens each parameter, pads it to world x size and gives the rank of index i within
the parameter's data-parallel group the slice [i * size, (i + 1) * size). The rank is taken
within that group (not the global rank: they differ once DeepSpeed uses subgroups, e.g. with
hybrid sharding or sequence parallelism).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Partition:
    start: int      # first flat index of this rank's slice in the flattened parameter
    size: int       # the slice's length, padding included
    valid: int      # elements of the slice inside the parameter (the rest is padding)
    group: object   # the parameter's data-parallel process group
    rank: int       # this rank's index within `group`
    world: int      # ranks in `group`


def is_partitioned(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_tensor")


def full_shape(p: torch.nn.Parameter) -> tuple[int, ...]:
    """The parameter's real shape (a ZeRO-3 parameter itself is an empty placeholder)."""
    return tuple(getattr(p, "ds_shape", p.shape))


def partition(p: torch.nn.Parameter) -> Partition:
    group = getattr(p, "ds_process_group", None) or p._z3_optimizer.dp_process_group
    rank, world = dist.get_rank(group=group), dist.get_world_size(group=group)
    size = p.ds_tensor.ds_numel
    start = rank * size
    return Partition(start=start, size=size, valid=max(0, min(size, p.ds_numel - start)),
                     group=group, rank=rank, world=world)


def local_fp32(p: torch.nn.Parameter, device=None) -> torch.Tensor:
    """This rank's fp32 master slice of p (padding cut off): the optimizer's copy, exact also
    when the module runs in bf16."""
    from deepspeed.utils import safe_get_local_fp32_param
    part = partition(p)
    local = safe_get_local_fp32_param(p)
    if local.numel() != part.size:
        raise RuntimeError(f"DeepSpeed's fp32 partition holds {local.numel()} elements, expected the "
                           f"partition size {part.size}")
    return local[:part.valid].detach().to(device or local.device, torch.float32)


def local_grad(p: torch.nn.Parameter) -> torch.Tensor:
    """This rank's gradient slice of p as DeepSpeed holds it (padding included)."""
    from deepspeed.utils import safe_get_local_grad
    return safe_get_local_grad(p)


@torch.no_grad()
def add_to_local_grad(p: torch.nn.Parameter, g: torch.Tensor, scale: float = 1.0) -> None:
    """grad_slice[:len(g)] += scale * g, written back through DeepSpeed's fragment API."""
    from deepspeed.utils import safe_set_local_grad
    grad = local_grad(p)
    grad[:g.numel()] += scale * g.reshape(-1).to(grad.device, grad.dtype)
    safe_set_local_grad(p, grad)


@torch.no_grad()
def zero_local_grad(p: torch.nn.Parameter) -> None:
    from deepspeed.utils import safe_set_local_grad
    safe_set_local_grad(p, torch.zeros_like(local_grad(p)))


def all_reduce_bucketed(tensors: list[torch.Tensor], groups: list) -> list[torch.Tensor]:
    """The sums over ranks of `tensors` (tensor i over groups[i]) with one all-reduce per
    distinct group: many small reductions (one per layer) cost one collective's latency."""
    buckets: dict[int, tuple[object, list[int]]] = {}
    for i, group in enumerate(groups):
        buckets.setdefault(id(group), (group, []))[1].append(i)
    out = list(tensors)
    for group, members in buckets.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in members])
        dist.all_reduce(flat, group=group)
        for i, piece in zip(members, flat.split([tensors[i].numel() for i in members])):
            out[i] = piece.view_as(tensors[i])
    return out
