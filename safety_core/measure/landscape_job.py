"""The landscape job: loss correlation, 2-D loss landscapes with their structural difference,
and the safety landscape, for a model against a reference (e.g. fine-tuned vs aligned).

Models are loaded one at a time, and the alignment and fine-tuning directions are streamed
tensor by tensor from the reference and base checkpoints, so at most one model plus its
directions is in memory.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch
from pydantic import Field
from safebasin.safety_core.anchor.basis import Checkpoint, resolve_model_dir
from safebasin.safety_core.args import Section
from safebasin.safety_core.measure.basin import SafetyLandscapeArgs, safety_landscape
from safebasin.safety_core.measure.correlation import correlate, example_nll
from safebasin.safety_core.measure.surfaces import (
    LandscapeArgs,
    loss_landscape,
    structural_difference,
)
from safebasin.safety_core.train.data import DataSource, load_conversations
from safebasin.safety_core.train.modeling import ModelArgs, load_model, load_tokenizer


class CorrelationArgs(Section):
    datasets: list[DataSource] = Field(min_length=1)
    max_length: int = Field(512, ge=8)
    batch_size: int = Field(8, ge=1)


class DirectionArgs(Section):
    """A direction between two models: end - start (a = 1 moves start onto end). Either may be a
    model with an adapter (merged), e.g. the attack's delta: aligned -> aligned + its LoRA."""
    start: ModelArgs
    end: ModelArgs


class LandscapeJobArgs(Section):
    reference: ModelArgs | None = Field(None, description="the model compared against (e.g. the "
                                        "aligned model); needed for correlation and structural difference")
    base: ModelArgs | None = Field(None, description="the reference's pre-alignment base: the "
                                   "alignment direction is reference - base")
    correlation: CorrelationArgs | None = None
    loss: LandscapeArgs | None = None
    safety: SafetyLandscapeArgs | None = None
    directions: dict[str, DirectionArgs] = Field(default_factory=dict, description="more named directions "
                                                 "of the safety landscape, each end - start")


def load_merged(args: ModelArgs, device: torch.device):
    """A plain model with any adapter merged in: landscapes move the full weights."""
    model = load_model(args)
    if args.adapter:
        model = model.merge_and_unload()
    return model.to(device).eval()


def streamed_delta(model, start: ModelArgs, end: ModelArgs | None = None) -> dict[str, torch.Tensor]:
    """end - start per parameter of `model`, read one tensor at a time from safetensors files;
    with end None the model's own weights are the end point (the fine-tuning delta)."""
    start_ckpt = Checkpoint(resolve_model_dir(start.resolved_path()), "reference")
    end_ckpt = Checkpoint(resolve_model_dir(end.resolved_path()), "base") if end else None
    delta = {}
    for name, p in model.named_parameters():
        if name not in start_ckpt or (end_ckpt is not None and name not in end_ckpt):
            continue
        a = start_ckpt.get(name).float()
        b = end_ckpt.get(name).float() if end_ckpt is not None else p.detach().float().cpu()
        if a.shape != b.shape:
            raise ValueError(f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
        delta[name] = (b - a).to(p.device)
    return delta


def model_delta(model, direction: DirectionArgs) -> dict[str, torch.Tensor]:
    """end - start per parameter of `model`: streamed from the checkpoints when neither side has
    an adapter, from the merged models otherwise (one at a time)."""
    if direction.start.adapter is None and direction.end.adapter is None:
        return streamed_delta(model, direction.start, direction.end)
    device = next(model.parameters()).device
    states = []
    for side in (direction.start, direction.end):
        other = load_merged(side, device)
        states.append({n: p.detach().float() for n, p in other.named_parameters()})
        del other
        gc.collect()
    names = [n for n, _ in model.named_parameters() if n in states[0] and n in states[1]]
    return {n: states[1][n] - states[0][n] for n in names}


def run_landscapes(model_args: ModelArgs, job: LandscapeJobArgs, out_dir: str | Path,
                   device: torch.device) -> dict:
    out = Path(out_dir)
    tokenizer = load_tokenizer(model_args)
    result: dict = {"files": {}}
    ref_nll, ref_surface = {}, None
    if job.reference is not None and (job.correlation or job.loss):
        ref = load_merged(job.reference, device)
        if job.correlation:
            for src in job.correlation.datasets:
                ref_nll[src.path] = example_nll(ref, tokenizer, load_conversations(src),
                                                max_length=job.correlation.max_length,
                                                batch_size=job.correlation.batch_size, desc="reference nll")
        if job.loss:
            ref_surface = loss_landscape(ref, tokenizer, job.loss, out / "reference")
        del ref
        gc.collect()

    model = load_merged(model_args, device)
    if job.correlation and ref_nll:
        result["correlation"] = {}
        for i, src in enumerate(job.correlation.datasets):
            convs = load_conversations(src)
            mine = example_nll(model, tokenizer, convs, max_length=job.correlation.max_length,
                               batch_size=job.correlation.batch_size, desc="model nll")
            full = correlate(ref_nll[src.path], mine, convs, out / f"correlation_{i}",
                             names=("reference", "model"))
            result["correlation"][src.path] = {k: full[k] for k in ("n", "pearson", "spearman", "mean_nll_a",
                                                                   "mean_nll_b", "files")}
    if job.loss:
        surface = loss_landscape(model, tokenizer, job.loss, out / "model")
        result["loss_landscape"] = {"center_loss": surface["center_loss"], "files": surface["files"]}
        if ref_surface is not None:
            result["loss_landscape"]["reference_center_loss"] = ref_surface["center_loss"]
            result["loss_landscape"]["structural_difference_pct"] = structural_difference(
                surface["loss"], ref_surface["loss"])
    if job.safety:
        directions = {}
        if job.reference is not None and job.base is not None:
            directions["alignment"] = streamed_delta(model, job.base, job.reference)
        if job.reference is not None:
            directions["finetune"] = streamed_delta(model, job.reference)
        for name, direction in job.directions.items():
            directions[name] = model_delta(model, direction)
        safety = safety_landscape(model, tokenizer, directions, job.safety, out / "safety")
        result["safety_landscape"] = {k: safety[k] for k in ("alphas", "curves", "degenerate", "basin", "threshold",
                                                             "metric", "files")}
    return result
