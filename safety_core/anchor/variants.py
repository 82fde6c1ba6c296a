"""What each anchor variant penalises, and how strongly: the weights c a variant takes from a
basis, the region of the penalty, and the start-of-training summary of the anchor's effective
strength (with the warning when the anchor is close to plain L2 shrinkage).

    safelora             ||(I - C) DeltaW||^2, c_i = sigma_i^2 / ||V||_F as stored (AsFT code)
    safelora-normalized  the same with c_i = sigma_i^2 / sigma_1^2 (the strongest direction weighs
                         1), rescaled from a safelora basis at load time
    projector            ||(I - C) DeltaW||^2, c_i = 1 (a projector basis, or a safelora one's U)
    random-subspace      ||(I - Q diag(c) Q^T) DeltaW||^2: safelora's c on a random orthonormal Q of
                         the same size, per layer; the control for "any subspace with that
                         spectrum" (does the alignment direction matter, or only how much is spared?)
    aligned              ||C DeltaW||^2 with c / c_max: the AsFT paper's reverse control, which
                         penalises the update inside the alignment span
    l2                   ||DeltaW||^2 (C = 0): the control for shrinkage; needs no basis

Why a load-time rescaling for safelora-normalized rather than another basis: U is the same, and
safelora's c_i = e_i / ||V||_F makes c / c_1 = e_i / e_1 exactly, so one extracted basis serves
safelora, its normalized form, the projector on its U and the aligned control, and a frontier
compares them on the very same directions. `random-subspace` swaps U for a random orthonormal Q at load time, from a
generator seeded by the layer's name alone: every rank and every run of a study draws the same Q,
so it is one fixed control, comparable across seeds and lambdas. `aligned` normalises too: for ||C DeltaW||^2 a common factor of c only rescales
lambda (by its square), so with max c = 1 its lambda is on the scale of l2's (the aligned
penalty is at most the l2 penalty at the same lambda).

Per output direction the outside penalty weighs the update's energy by (1 - c_i)^2 inside
span(U_k) and by 1 outside it, so it differs from lambda ||DeltaW||^2 by at most
max_i (2 c_i - c_i^2) of the energy in any direction: with c_max = 0.045 that is 9%, and the
"anchor" is plain L2 shrinkage of the update.
"""

from __future__ import annotations

import statistics
import warnings
import zlib

import torch

VARIANTS = ("safelora", "safelora-normalized", "projector", "random-subspace", "aligned", "l2")
# The basis variants (manifest "variant") each anchor variant reads; None: any, or none at all.
BASIS_OF = {"safelora": ("safelora",), "safelora-normalized": ("safelora",), "projector": ("projector", "safelora"),
            "random-subspace": ("safelora",), "aligned": None, "l2": None}
# Below this bound on how much the outside penalty departs from plain L2 in any direction
# (max 2c - c^2), the anchor cannot steer an update: the training warns.
NEAR_L2 = 0.1


class AnchorScaleWarning(UserWarning):
    """The anchor's weights c are so small that the penalty is close to plain L2 shrinkage."""


def region(variant: str) -> str:
    """The kernels' region: "inside" (||C DeltaW||^2) for the aligned control, else "outside"."""
    return "inside" if variant == "aligned" else "outside"


def compatibility_problem(variant: str, basis_variant: str | None) -> str | None:
    """Why an anchor variant cannot use a basis of basis_variant (None: no basis), or None."""
    if variant not in VARIANTS:
        return f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}"
    if basis_variant is None:
        return None if variant == "l2" else f"variant {variant!r} needs a basis (only 'l2' runs without one)"
    want = BASIS_OF[variant]
    if want is not None and basis_variant not in want:
        return (f"variant {variant!r} needs a {' or '.join(want)} basis, but the basis was extracted as "
                f"{basis_variant!r} (`safebasin align-basis --variant {want[0]}`)")
    return None


def weights(variant: str, c: torch.Tensor) -> torch.Tensor:
    """The c a variant's penalty uses, from a basis layer's stored c (descending)."""
    if variant == "l2":
        return c[:0]
    if variant in ("safelora-normalized", "aligned") and c.numel():
        return c / c.max()
    if variant == "projector":  # a projector basis stores 1s; a safelora basis lends its U
        return torch.ones_like(c)
    return c


def directions(variant: str, layer: str, U: torch.Tensor) -> torch.Tensor:
    """The orthonormal columns a variant's C is built on: the basis's U, or for random-subspace a
    random Q of U's shape (QR of a Gaussian, drawn in float64 on the CPU from a generator seeded
    by the layer's name, so that it is the same on every rank, device and run)."""
    if variant != "random-subspace" or U.shape[1] == 0:
        return U
    gen = torch.Generator().manual_seed(zlib.crc32(layer.encode()))
    q, r = torch.linalg.qr(torch.randn(U.shape, generator=gen, dtype=torch.float64))
    # Signs fixed by R's diagonal: the Haar-distributed Q, not one that depends on the QR routine.
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return q.to(U.device, U.dtype)


def strength(variant: str, lam: float, cs: list[torch.Tensor], dims: list[int]) -> tuple[str, str | None]:
    """(summary line, warning or None) of the anchor's effective strength at the start of
    training; cs: each anchored layer's penalty c, dims: its d_out."""
    if variant == "l2":
        return f"anchor l2: lambda {lam:g} x ||DeltaW||^2 on {len(dims)} layer(s), no basis direction", None
    maxima = [float(c.max()) if c.numel() else 0.0 for c in cs]
    medians = [float(c.median()) if c.numel() else 0.0 for c in cs]
    c_max, c_med = max(maxima), statistics.median(medians)
    span = statistics.mean(c.numel() / d for c, d in zip(cs, dims))
    head = (f"anchor {variant}: lambda {lam:g}; c in [{min(float(c.min()) for c in cs if c.numel()):.3g}, "
            f"{c_max:.3g}] (median of layer medians {c_med:.3g}); span(U_k) holds {span:.1%} of a "
            f"layer's output directions on average")
    if variant == "aligned":
        return (f"{head}; penalty weight per direction c_i^2 inside the span (lambda x c^2 up to "
                f"{lam * c_max ** 2:.3g}), 0 outside it"), None
    # The penalty's weight per direction is (1 - c)^2 against L2's 1: the largest gap is
    # max_i |2 c_i - c_i^2| over every direction (c > 2 makes the anchor stronger than L2 there).
    departure = max((float((2 * c - c * c).abs().max()) for c in cs if c.numel()), default=0.0)
    line = (f"{head}; penalty weight per direction (1 - c_i)^2 inside the span, 1 outside it: at most "
            f"{departure:.1%} away from plain L2 (lambda ||DeltaW||^2) in any direction, max_i |2 c_i - c_i^2|")
    if departure < NEAR_L2:
        return line, (f"anchor {variant}: c_max = {c_max:.3g}, so the penalty is within {departure:.1%} of plain L2 "
                      f"shrinkage (lambda ||DeltaW||^2) in every direction and cannot steer the update toward the "
                      f"alignment span; use anchor.variant: safelora-normalized or projector, or compare with "
                      f"anchor.variant: l2")
    return line, None


def layer_strengths(names: list[str], cs: list[torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per anchored layer, from the c its penalty uses: c_max, sum of c, and the largest gap
    between the penalty's weight per direction, (1 - c_i)^2, and plain L2's 1: max_i |2 c_i - c_i^2|."""
    return {name: {"c_max": float(c.max()) if c.numel() else 0.0, "c_sum": float(c.sum()),
                   "l2_gap": float((2 * c - c * c).abs().max()) if c.numel() else 0.0}
            for name, c in zip(names, cs)}


def strength_summary(per_layer: dict[str, dict[str, float]]) -> dict[str, float]:
    """The metrics logged with the first step: each per-layer number's maximum over layers."""
    return {f"anchor_{key}": max((row[key] for row in per_layer.values()), default=0.0)
            for key in ("c_max", "c_sum", "l2_gap")}


def announce(variant: str, lam: float, cs: list[torch.Tensor], dims: list[int],
             names: list[str] | None = None) -> None:
    """Print the strength summary (and, given the layer names, one line per layer) and raise
    AnchorScaleWarning when it has a warning."""
    line, warning = strength(variant, lam, cs, dims)
    print(f"[safebasin] {line}", flush=True)
    if names is not None and variant != "l2":
        for name, row in layer_strengths(names, cs).items():
            print(f"[safebasin]   {name}: c_max {row['c_max']:.3g}, sum c {row['c_sum']:.3g}, "
                  f"max |2c - c^2| {row['l2_gap']:.3g}", flush=True)
    if warning:
        warnings.warn(warning, AnchorScaleWarning, stacklevel=3)


def announce_coverage(model, shapes: list[tuple[int, int]]) -> float:
    """Full parameters: only the weights with a layer in the basis (all 2-D ones for l2) are
    anchored, the rest train freely. Prints (rank 0) and returns the share of trainable
    parameters anchored; the trainer logs it as anchor_coverage with the first step."""
    from math import prod
    from safebasin.safety_core import zero3
    from safebasin.safety_core.distributed import is_main
    trainable = sum(prod(zero3.full_shape(p)) for p in model.parameters() if p.requires_grad)
    anchored = sum(prod(shape) for shape in shapes)
    if is_main():
        print(f"[safebasin] anchor: {len(shapes)} anchored weights hold {anchored:,} of {trainable:,} "
              f"trainable parameters ({100 * anchored / trainable:.1f}%); the rest train without the "
              f"anchor", flush=True)
    return anchored / trainable
