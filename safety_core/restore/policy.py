"""The trust region on the step of restoration: the local quadratic model of the retain loss
that predicts a step's effect (the paper's Eq. 3), its radius, and the rule that moves it."""

from __future__ import annotations

import math
from dataclasses import dataclass


def predicted_retain_change(retain_grad_dot_step: float, step_scale: float, g_h_g: float) -> float:
    """The change of the retain loss the local quadratic model predicts for a step p = t H g:

        m(p) = <g_retain, p> + 1/2 p^T B p,   and with B = H^-1:  p^T B p = t^2 g^T H g,

    so the curvature term costs no vector work: g^T H g is `DirectionInfo.g_dot_d` of the
    direction. At a fine-tuned point g_retain is close to zero and the first-order term alone
    is mostly noise; the curvature term is what the model predicts there."""
    return retain_grad_dot_step + 0.5 * step_scale * step_scale * g_h_g


def agreement(actual: float, predicted: float) -> float:
    """rho = actual / predicted change (NaN when nothing was predicted)."""
    return actual / predicted if predicted != 0 else float("nan")


@dataclass
class TrustRegion:
    """radius: the largest L2 norm a step may have. After each try, `update` shrinks it (by
    `factor`) when the step was rejected or the model was far off: rho < shrink_below, or rho >
    shrink_above (the loss rose several times more than predicted); it grows it (by `growth`)
    only when the model held, grow_above <= rho <= grow_below, on a step clipped to the
    boundary. Between the bands the radius stays. NaN rho (nothing predicted) leaves it."""

    radius: float
    shrink_below: float = 0.25
    grow_above: float = 0.75
    grow_below: float = 1.5    # the band around 1 in which the model counts as right
    shrink_above: float = 4.0  # above this the quadratic model underestimates badly
    factor: float = 4.0        # shrink by this
    growth: float = 2.0        # grow by this

    def clip(self, norm: float) -> tuple[float, bool]:
        """(the step norm to take for a proposed norm, whether it was clipped to the radius)."""
        return min(norm, self.radius), norm >= self.radius

    def update(self, step_norm: float, rho: float, accepted: bool, on_boundary: bool) -> float:
        if not accepted:
            # Shrink below the step just tried: a radius left above a short step would retry it.
            self.radius = min(self.radius, step_norm) / self.factor
        elif math.isnan(rho):
            pass
        elif rho < self.shrink_below or rho > self.shrink_above:
            self.radius /= self.factor
        elif self.grow_above <= rho <= self.grow_below and on_boundary:
            self.radius *= self.growth
        return self.radius
