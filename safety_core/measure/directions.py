"""Directions in parameter space for landscapes: the parameters to move, gradient-informed,
random and model-delta directions scaled per tensor (filter-normalisation style, so every
tensor moves in proportion to its own size), and moving a model along them with a bit-exact
restore of the saved parameters.

The parameters must be replicated on every rank (not ZeRO-3 partitioned); data is sharded over
ranks when torch.distributed is initialized.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping

import torch
from safebasin.safety_core.distributed import (
    all_reduce_sum,
    all_reduce_tensor_,
    chunks,
    is_zero3,
    rank_world,
)
from safebasin.safety_core.measure.correlation import batch_nll
from safebasin.safety_core.measure.generation import pad_id
from safebasin.safety_core.train import data as data_lib
from safebasin.safety_core.train.data import Conversation

Direction = dict[str, torch.Tensor]



def select_parameters(model, include: list[str] | None = None) -> dict[str, torch.nn.Parameter]:
    """Parameters whose name contains one of `include`, or every trainable one by default."""
    if is_zero3(model):
        raise ValueError("landscapes need replicated parameters; gather a ZeRO-3 model first")
    if include is None:
        chosen = {n: p for n, p in model.named_parameters() if p.requires_grad}
        what = "trainable parameters"
    else:
        chosen = {n: p for n, p in model.named_parameters() if any(s in n for s in include)}
        what = f"parameters matching {include}"
    if not chosen:
        raise ValueError(f"the model has no {what}")
    return chosen


def _norm(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().norm()


def scale_per_tensor(direction: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> Direction:
    """Each tensor of `direction` rescaled to the norm of the same tensor in `reference`.
    A zero tensor on either side gives a zero direction: there is no scale to move it by."""
    out = {}
    for name, d in direction.items():
        d = d.detach().float()
        dn, rn = _norm(d), _norm(reference[name])
        out[name] = d * (rn / dn) if dn > 0 and rn > 0 else torch.zeros_like(d)
    return out


def orthogonalize(direction: Mapping[str, torch.Tensor], against: Mapping[str, torch.Tensor]) -> Direction:
    """Remove from each tensor its component along the same tensor of `against` (per tensor, so
    the result stays orthogonal after per-tensor rescaling, and hence orthogonal overall)."""
    out = {}
    for name, d in direction.items():
        d, a = d.detach().float(), against[name].detach().float()
        aa = float((a * a).sum())
        out[name] = d - (float((d * a).sum()) / aa) * a if aa > 0 else d.clone()
    return out


def random_direction(params: Mapping[str, torch.Tensor], seed: int, *,
                     orthogonal_to: Mapping[str, torch.Tensor] | None = None) -> Direction:
    """Gaussian direction scaled per tensor to each parameter's norm, optionally orthogonal to
    another direction. Drawn on the CPU in name order, so it depends on the seed alone."""
    g = torch.Generator().manual_seed(seed)
    raw = {n: torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.device) for n, p in sorted(params.items())}
    if orthogonal_to is not None:
        raw = orthogonalize(raw, orthogonal_to)
    return scale_per_tensor(raw, params)


def delta_direction(model_a_state: Mapping[str, torch.Tensor], model_b_state: Mapping[str, torch.Tensor],
                    names: list[str] | None = None) -> Direction:
    """theta_b - theta_a (unscaled: a = 1 moves model a onto model b), e.g. aligned - base
    (the alignment direction) or fine-tuned - aligned (the fine-tuning delta)."""
    names = sorted(model_a_state) if names is None else names
    missing = [n for n in names if n not in model_a_state or n not in model_b_state]
    if missing:
        raise KeyError(f"delta_direction: {len(missing)} name(s) missing from a state, e.g. {missing[:3]}")
    out = {}
    for n in names:
        a, b = model_a_state[n], model_b_state[n]
        if a.shape != b.shape:
            raise ValueError(f"delta_direction: {n} has shape {tuple(a.shape)} vs {tuple(b.shape)}")
        if a.is_floating_point():
            out[n] = b.detach().float() - a.detach().float().to(b.device)
    return out


def gradient_direction(model, tokenizer, conversations: list[Conversation], params: Mapping[str, torch.Tensor],
                       *, batch_size: int = 8, max_length: int = 512) -> Direction:
    """Gradient of the dataset's token-weighted mean response loss w.r.t. `params`, scaled per
    tensor to each parameter's norm. Summed over ranks when distributed."""
    named = dict(model.named_parameters())
    chosen = {n: named[n] for n in params}
    flags = {n: p.requires_grad for n, p in named.items()}
    grads = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in chosen.items()}
    pad = pad_id(tokenizer)
    encoded = [data_lib.encode(tokenizer, c, max_length) for c in conversations]
    device = next(model.parameters()).device
    rank, world = rank_world()
    tokens = 0
    was_training = model.training
    model.eval()
    try:
        for n, p in named.items():
            p.requires_grad_(n in chosen)
        for idx in chunks(range(len(encoded)), batch_size)[rank::world]:
            batch = {k: v.to(device) for k, v in data_lib.collate([encoded[i] for i in idx], pad).items()}
            sums, counts = batch_nll(model, batch)
            for n, g in zip(chosen, torch.autograd.grad(sums.sum(), list(chosen.values()), allow_unused=True)):
                if g is not None:
                    grads[n] += g.float()
            tokens += int(counts.sum())
    finally:
        for n, p in named.items():
            p.requires_grad_(flags[n])
        model.train(was_training)
    total = all_reduce_sum([tokens])[0]
    for g in grads.values():
        all_reduce_tensor_(g).div_(max(total, 1.0))
    return scale_per_tensor(grads, chosen)


@contextmanager
def perturbed(model, names: list[str]) -> Iterator:
    """Yields set(terms): sets params[n] = saved[n] + sum(c * d[n] for c, d in terms). On exit
    every parameter is written back from its saved copy, so it is restored bit-exactly."""
    named = dict(model.named_parameters())
    missing = [n for n in names if n not in named]
    if missing:
        raise KeyError(f"{len(missing)} direction tensor(s) name no model parameter, e.g. {missing[:3]}")
    saved = {n: named[n].detach().clone() for n in names}

    @torch.no_grad()
    def set_point(terms: list[tuple[float, Mapping[str, torch.Tensor]]]) -> None:
        for n in names:
            value = saved[n].float()
            for coef, d in terms:
                if n in d and coef != 0.0:
                    value = value + coef * d[n].to(value.device, torch.float32)
            named[n].copy_(value.to(saved[n].dtype))

    try:
        yield set_point
    finally:
        with torch.no_grad():
            for n in names:
                named[n].copy_(saved[n])


def check_shapes(model, direction: Mapping[str, torch.Tensor], what: str) -> None:
    named = dict(model.named_parameters())
    for n, d in direction.items():
        if n not in named:
            raise KeyError(f"{what}: {n} is not a parameter of the model")
        if tuple(d.shape) != tuple(named[n].shape):
            raise ValueError(f"{what}: {n} has shape {tuple(d.shape)}, the parameter {tuple(named[n].shape)}")
