"""2-D loss landscapes L(theta + a d1 + b d2) over a parameter subset, d1 the normalised
gradient of the dataset's loss and d2 random and orthogonal to it; and the structural
difference of two surfaces: 1 - Pearson r of their 5-point Laplacians, in percent (curvature
shape only: blind to a constant offset and to a tilt of the surface).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
from pydantic import Field
from safebasin.safety_core.args import Section
from safebasin.safety_core.distributed import is_main
from safebasin.safety_core.measure.correlation import example_nll, mean_nll, pearson
from safebasin.safety_core.measure.directions import (
    Direction,
    check_shapes,
    gradient_direction,
    perturbed,
    random_direction,
    select_parameters,
)
from safebasin.safety_core.progress import track
from safebasin.safety_core.train.data import (
    Conversation,
    DataSource,
    load_conversations,
)


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



def loss_surface(model, tokenizer, conversations: list[Conversation], d1: Direction, d2: Direction,
                 alphas, betas, *, batch_size: int = 8, max_length: int = 512, progress: bool = True) -> np.ndarray:
    """z[i, j] = token-weighted mean response loss at theta + alphas[i] d1 + betas[j] d2."""
    check_shapes(model, d1, "d1")
    check_shapes(model, d2, "d2")
    z = np.empty((len(alphas), len(betas)))
    points = [(i, j) for i in range(len(alphas)) for j in range(len(betas))]
    with perturbed(model, sorted(set(d1) | set(d2))) as set_point:
        for i, j in track(points, "loss landscape", disable=not progress or not is_main()):
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
            from safebasin.safety_core.measure import plots
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
