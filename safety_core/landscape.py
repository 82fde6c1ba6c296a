"""Loss and safety landscapes around a model's parameters.

- 2-D loss landscape L(theta + a d1 + b d2) over a parameter subset, d1 the normalised gradient
  of the dataset's loss, d2 random and orthogonal to d1, both scaled per tensor to that tensor's
  norm (filter-normalisation style, so every tensor moves in proportion to its own size).
- Structural difference of two surfaces: 1 - Pearson r of their 5-point Laplacians, in percent
  (curvature shape only: blind to a constant offset and to a tilt of the surface).
- Safety landscape: HRR (or harmful-response loss) along theta + a d for named directions, and
  the basin width around a = 0.

Perturbations write into the live parameters and restore the saved copies bit-exactly. The
parameters must be replicated on every rank (not ZeRO-3 partitioned); data is sharded over
ranks when torch.distributed is initialized.
"""

from __future__ import annotations

import csv
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Literal, Mapping

import numpy as np
import torch
from pydantic import Field, field_validator
from tqdm.auto import tqdm

from safebasin.safety_core import data as data_lib
from safebasin.safety_core.args import Section
from safebasin.safety_core.correlation import batch_nll, example_nll, mean_nll, pearson
from safebasin.safety_core.data import Conversation, DataSource, load_conversations, load_prompts
from safebasin.safety_core.distributed import (all_reduce_sum, all_reduce_tensor_, chunks, is_main, is_zero3,
                                                rank_world)
from safebasin.safety_core.evaluation import judge_generations
from safebasin.safety_core.generation import generate, pad_id
from safebasin.safety_core.judges import Judge, JudgeArgs, make_judge, summarize

Direction = dict[str, torch.Tensor]


class LandscapeArgs(Section):
    data: DataSource
    params: list[str] | None = Field(None, description="substrings of parameter names to perturb "
                                     "(e.g. [lora_], [layers.1.]); default: every trainable parameter")
    grid_size: int = Field(21, ge=3, description="points per axis (odd keeps a = b = 0 on the grid)")
    span: float = Field(1.0, gt=0, description="a and b range over [-span, span]")
    seed: int = 0
    batch_size: int = Field(8, ge=1)
    max_length: int = Field(512, ge=8)
    system_prompt: str | None = None


class SafetyLandscapeArgs(Section):
    harmful: DataSource
    metric: Literal["hrr", "loss"] = Field("hrr", description="hrr: judge greedy completions; loss: "
                                           "NLL of the harmful responses")
    alphas: list[float] = Field(default_factory=lambda: [round(-1 + 0.2 * i, 10) for i in range(11)])
    threshold: float | None = Field(None, description="basin edge; default: the value at a = 0 "
                                    "plus (hrr) or minus (loss) tolerance")
    tolerance: float = Field(0.1, ge=0)
    safe: Literal["auto", "below", "above"] = Field("auto", description="which side of the threshold "
                                                    "is safe; auto: below for hrr, above for loss")
    params: list[str] | None = Field(None, description="parameters of the random directions")
    random_directions: int = Field(0, ge=0, description="add this many random directions (seeds seed, seed+1, ...)")
    seed: int = 0
    judge: JudgeArgs = Field(default_factory=JudgeArgs)
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(8, ge=1)
    max_length: int = Field(512, ge=8)
    system_prompt: str | None = None

    @field_validator("alphas")
    @classmethod
    def _with_zero(cls, v: list[float]) -> list[float]:
        # a = 0 (the model itself) anchors the basin and the default threshold.
        return sorted(set(float(a) for a in v) | {0.0})

    def safe_side(self) -> str:
        return self.safe if self.safe != "auto" else ("below" if self.metric == "hrr" else "above")


# ---------------------------------------------------------------------------------------------
# Parameters and directions


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


def _check_shapes(model, direction: Mapping[str, torch.Tensor], what: str) -> None:
    named = dict(model.named_parameters())
    for n, d in direction.items():
        if n not in named:
            raise KeyError(f"{what}: {n} is not a parameter of the model")
        if tuple(d.shape) != tuple(named[n].shape):
            raise ValueError(f"{what}: {n} has shape {tuple(d.shape)}, the parameter {tuple(named[n].shape)}")


# ---------------------------------------------------------------------------------------------
# 2-D loss landscape


def loss_surface(model, tokenizer, conversations: list[Conversation], d1: Direction, d2: Direction,
                 alphas, betas, *, batch_size: int = 8, max_length: int = 512, progress: bool = True) -> np.ndarray:
    """z[i, j] = token-weighted mean response loss at theta + alphas[i] d1 + betas[j] d2."""
    _check_shapes(model, d1, "d1")
    _check_shapes(model, d2, "d2")
    z = np.empty((len(alphas), len(betas)))
    points = [(i, j) for i in range(len(alphas)) for j in range(len(betas))]
    with perturbed(model, sorted(set(d1) | set(d2))) as set_point:
        for i, j in tqdm(points, desc="loss landscape", disable=not progress or not is_main()):
            set_point([(float(alphas[i]), d1), (float(betas[j]), d2)])
            z[i, j] = mean_nll(example_nll(model, tokenizer, conversations, max_length=max_length,
                                           batch_size=batch_size, progress=False))
    return z


def grid(grid_size: int, span: float) -> list[float]:
    return [float(x) for x in np.linspace(-span, span, grid_size)]


def loss_landscape(model, tokenizer, args: LandscapeArgs, out_dir=None, *,
                   conversations: list[Conversation] | None = None) -> dict:
    """The gradient-informed 2-D landscape of args.data's loss. Returns alphas, betas, loss
    (grid, loss[i][j] at (alphas[i], betas[j])), center_loss (the model's own loss), params (the
    perturbed names) and files; with out_dir, rank 0 writes loss_landscape.csv (a,b,loss rows)
    and loss_landscape.png (contour and surface)."""
    convs = conversations if conversations is not None else load_conversations(args.data, args.system_prompt)
    params = select_parameters(model, args.params)
    d1 = gradient_direction(model, tokenizer, convs, params, batch_size=args.batch_size, max_length=args.max_length)
    d2 = random_direction(params, args.seed, orthogonal_to=d1)
    axis = grid(args.grid_size, args.span)
    z = loss_surface(model, tokenizer, convs, d1, d2, axis, axis, batch_size=args.batch_size,
                     max_length=args.max_length)
    center = mean_nll(example_nll(model, tokenizer, convs, max_length=args.max_length,
                                  batch_size=args.batch_size, progress=False))
    result = {"alphas": axis, "betas": axis, "loss": z.tolist(), "center_loss": center,
              "params": sorted(params), "n_examples": len(convs), "files": {}}
    if out_dir is not None:
        out = Path(out_dir)
        result["files"] = {"csv": str(out / "loss_landscape.csv"), "png": str(out / "loss_landscape.png")}
        if is_main():
            write_surface_csv(result["files"]["csv"], axis, axis, z)
            from safebasin.safety_core import plots
            plots.contour_plot(result["files"]["png"], axis, axis, z, xlabel="a (gradient direction)",
                               ylabel="b (random direction)", title=f"loss landscape ({args.data.path})")
    return result


def write_surface_csv(path, alphas, betas, z) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["a", "b", "loss"])
        for i, a in enumerate(alphas):
            for j, b in enumerate(betas):
                w.writerow([a, b, repr(float(z[i][j]))])
    return path


def read_surface_csv(path) -> tuple[list[float], list[float], np.ndarray]:
    """(alphas, betas, z) back from write_surface_csv, e.g. to compare two saved surfaces."""
    with Path(path).open(newline="") as f:
        rows = [(float(r["a"]), float(r["b"]), float(r["loss"])) for r in csv.DictReader(f)]
    alphas = sorted({a for a, _, _ in rows})
    betas = sorted({b for _, b, _ in rows})
    z = np.full((len(alphas), len(betas)), np.nan)
    ia, ib = {a: i for i, a in enumerate(alphas)}, {b: j for j, b in enumerate(betas)}
    for a, b, v in rows:
        z[ia[a], ib[b]] = v
    return alphas, betas, z


def laplacian(z) -> np.ndarray:
    """Discrete 5-point Laplacian on the interior points (unit spacing)."""
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2 or min(z.shape) < 3:
        raise ValueError(f"the Laplacian needs a 2-D grid of at least 3 x 3, got shape {z.shape}")
    return z[2:, 1:-1] + z[:-2, 1:-1] + z[1:-1, 2:] + z[1:-1, :-2] - 4.0 * z[1:-1, 1:-1]


def structural_difference(z_a, z_b) -> float:
    """(1 - Pearson r of the two surfaces' Laplacians) x 100, in [0, 200]. Identical Laplacians
    give 0 even when constant (a paraboloid); otherwise a constant Laplacian has no correlation
    to speak of and the result is nan."""
    la, lb = laplacian(z_a), laplacian(z_b)
    if la.shape != lb.shape:
        raise ValueError(f"surfaces on different grids: {np.shape(z_a)} vs {np.shape(z_b)}")
    if np.allclose(la, lb, rtol=1e-9, atol=1e-12):
        return 0.0
    r = pearson(la, lb)
    return float("nan") if math.isnan(r) else max(0.0, (1.0 - r) * 100.0)


# ---------------------------------------------------------------------------------------------
# Safety landscape


def basin_width(alphas, values, threshold: float, *, safe: Literal["below", "above"] = "below") -> dict:
    """The contiguous run of safe points around a = 0 (safe: value at or under the threshold, or
    at or over it with safe='above'). width = the largest |a| in that run (0 when a = 0 itself
    is unsafe); left / right: its ends. None values (nothing rated) end the run."""
    pairs = sorted(zip((float(a) for a in alphas), values))
    xs = [a for a, _ in pairs]
    if 0.0 not in xs:
        raise ValueError("basin_width needs a = 0 among the alphas")

    def ok(v) -> bool:
        return v is not None and not math.isnan(v) and (v <= threshold if safe == "below" else v >= threshold)

    c = xs.index(0.0)
    if not ok(pairs[c][1]):
        return {"width": 0.0, "left": 0.0, "right": 0.0, "center_safe": False}
    lo = c
    while lo > 0 and ok(pairs[lo - 1][1]):
        lo -= 1
    hi = c
    while hi < len(xs) - 1 and ok(pairs[hi + 1][1]):
        hi += 1
    return {"width": max(abs(xs[lo]), abs(xs[hi])), "left": xs[lo], "right": xs[hi], "center_safe": True}


def safety_landscape(model, tokenizer, directions: Mapping[str, Mapping[str, torch.Tensor]],
                     args: SafetyLandscapeArgs, out_dir=None, *, judge: Judge | None = None,
                     conversations: list[Conversation] | None = None) -> dict:
    """HRR (or harmful-response loss) along theta + a d for each named direction, with its basin
    width. args.random_directions random directions over args.params are added as random0, ....
    Returns alphas, metric, threshold, safe, curves {name: [value per alpha]}, unparsed {name:
    [count per alpha]} (hrr), basin {name: basin_width(...)}, files; with out_dir rank 0 writes
    safety_landscape.csv (direction,alpha,value,unparsed) and safety_landscape.png."""
    dirs = {name: dict(d) for name, d in directions.items()}
    if args.random_directions:
        params = select_parameters(model, args.params)
        for k in range(args.random_directions):
            dirs[f"random{k}"] = random_direction(params, args.seed + k)
    if not dirs:
        raise ValueError("safety_landscape needs at least one direction")
    for name, d in dirs.items():
        _check_shapes(model, d, f"direction {name!r}")
    if args.metric == "hrr":
        convs = conversations if conversations is not None else load_prompts(args.harmful, args.system_prompt)
        judge = judge or make_judge(args.judge)
    else:
        convs = conversations if conversations is not None else load_conversations(args.harmful, args.system_prompt)

    def measure() -> tuple[float | None, int]:
        if args.metric == "loss":
            return mean_nll(example_nll(model, tokenizer, convs, max_length=args.max_length,
                                        batch_size=args.batch_size, progress=False)), 0
        gens = generate(model, tokenizer, convs, max_new_tokens=args.max_new_tokens,
                        batch_size=args.batch_size, progress=False)
        stats = summarize(judge_generations(judge, gens, args.judge.batch_size))
        return stats["hrr"], stats["unparsed"]

    curves, unparsed = {}, {}
    center_value, center_unparsed = None, 0
    for name, d in dirs.items():
        curves[name], unparsed[name] = [], []
        with perturbed(model, sorted(d)) as set_point:
            for a in tqdm(args.alphas, desc=f"safety landscape ({name})", disable=not is_main()):
                if a == 0.0 and center_value is not None:
                    value, bad = center_value, center_unparsed  # theta itself: the same for every direction
                else:
                    set_point([(a, d)])
                    value, bad = measure()
                    if a == 0.0:
                        center_value, center_unparsed = value, bad
                curves[name].append(value)
                unparsed[name].append(bad)
    safe = args.safe_side()
    threshold = args.threshold
    if threshold is None:
        if center_value is None:
            raise ValueError("no value at a = 0 to set the threshold from; set threshold")
        threshold = center_value + args.tolerance if safe == "below" else center_value - args.tolerance
    basin = {name: basin_width(args.alphas, curves[name], threshold, safe=safe) for name in dirs}
    result = {"alphas": list(args.alphas), "metric": args.metric, "threshold": threshold, "safe": safe,
              "curves": curves, "unparsed": unparsed, "basin": basin, "center": center_value,
              "judge": judge.name if judge is not None else None, "files": {}}
    if out_dir is not None:
        out = Path(out_dir)
        result["files"] = {"csv": str(out / "safety_landscape.csv"), "png": str(out / "safety_landscape.png")}
        if is_main():
            _write_safety(result, out)
    return result


def _write_safety(result: dict, out: Path) -> None:
    from safebasin.safety_core import plots
    out.mkdir(parents=True, exist_ok=True)
    with open(result["files"]["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["direction", "alpha", "value", "unparsed"])
        for name, values in result["curves"].items():
            for a, v, u in zip(result["alphas"], values, result["unparsed"][name]):
                w.writerow([name, a, "" if v is None else repr(float(v)), u])
    label = "HRR" if result["metric"] == "hrr" else "harmful-response loss"
    plots.line_plot(result["files"]["png"], result["alphas"], result["curves"], xlabel="a",
                    ylabel=label, title=f"safety landscape ({label})",
                    hlines={f"threshold {result['threshold']:.3g}": result["threshold"]})
