"""How far restoration steps: the step length the task budget allows, and the trust region on it.

The budget (the paper's Eq. 3-4). Restoration maximises the forget loss subject to
L_retain(theta) <= L_retain(theta_ft) + eps. Along a direction d the local quadratic model of
the retain loss is

    m(t) = a t + 1/2 c t^2,   a = <g_retain, d>,   c = d^T B d,

and the step length is the t* at which m reaches the budget still left,
eps - (L_retain(theta) - L_retain(theta_ft)): the positive root of m(t) = budget (`RetainModel`).
No length in parameter units is needed, so the first step is sensible on any model. With
L-BFGS, c = g^T H g for d = H g (free: the recursion's own scalar); that c assumes the
top-of-spectrum curvature gamma in every direction the m pairs do not span, so it overestimates
what a step really costs. After each accepted step the curvature the retain loss really had
along it, (g_r(theta + p) - g_r(theta)) . p, is measured from the retain gradient the next
direction needs anyway, and its ratio to the model's prediction calibrates the next c.

The trust region (Nocedal & Wright, Alg. 4.1, read for a constraint). rho compares the retain
loss's actual change with the predicted one: the retain loss is the constraint, not the
objective, so rho < 1 means the step cost less than predicted and rho < 0 that the retain loss
fell, both good news. The region is a cap on the step's norm relative to the norm of the
trainable parameters (`radius`, dimensionless, so it means the same on any model):
- a rejected step (over budget, or no gain of the forget loss) shrinks it below that step;
- an accepted step that cost several times its prediction (rho > shrink_above) shrinks it: the
  model was badly optimistic there;
- an accepted step that cost no more than predicted (rho <= 1) grows it when the step was
  capped by it, and never shrinks it; between 1 and shrink_above it stays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class RetainModel:
    """m(t) = slope t + 1/2 curvature t^2: the predicted change of the retain loss for a step
    t d (slope = <g_retain, d>, curvature = d^T B d)."""

    slope: float
    curvature: float

    def change(self, t: float) -> float:
        return self.slope * t + 0.5 * self.curvature * t * t

    def step_for(self, budget: float) -> float:
        """The smallest t > 0 with m(t) = budget; inf when m never reaches it (it falls, or
        curves down, forever); 0 with no budget left. Written as 2 B / (a + sqrt(a^2 + 2 c B)),
        which has no cancellation when a > 0 and is the same root otherwise."""
        if not budget > 0:
            return 0.0
        disc = self.slope * self.slope + 2.0 * self.curvature * budget
        if disc < 0:
            return math.inf  # curving down before the budget is reached
        denom = self.slope + math.sqrt(disc)
        return 2.0 * budget / denom if denom > 0 else math.inf


def constraint_ratio(actual: float, predicted: float) -> float:
    """rho = actual / predicted change of the retain loss. A prediction of no rise (<= 0) has no
    ratio: a step that then fell or stayed counts as on prediction (0), one that rose as
    infinitely over it."""
    if predicted > 0:
        return actual / predicted
    return 0.0 if actual <= 0 else math.inf


def calibration(measured: float, predicted: float) -> float | None:
    """measured / predicted curvature along an accepted step, the factor the next prediction
    is scaled by; None when either says nothing (no prediction, no measurement, NaN). A negative
    measured curvature gives 0: the next model is linear, and the region caps the step."""
    if not (predicted > 0) or not math.isfinite(measured):
        return None
    return max(measured, 0.0) / predicted


@dataclass
class TrustRegion:
    """radius: the largest step norm, relative to the norm of the trainable parameters."""

    radius: float
    shrink_above: float = 4.0  # an accepted step that cost this many times its prediction
    factor: float = 2.0        # shrink by this (the backtracking halves: the same factor)
    growth: float = 2.0        # grow by this

    def cap(self, t: float, direction_norm: float, params_norm: float) -> tuple[float, bool]:
        """(the step length to take for a proposed t along a direction of norm `direction_norm`,
        whether the region capped it)."""
        limit = self.radius * params_norm / direction_norm if direction_norm > 0 else math.inf
        return (t, False) if t <= limit else (limit, True)

    def update(self, relative_step: float, rho: float, accepted: bool, capped: bool) -> float:
        if not accepted:
            # Below the step just tried: a radius left above a short step would allow it again.
            self.radius = min(self.radius, relative_step) / self.factor
        elif rho > self.shrink_above:
            self.radius = min(self.radius, relative_step) / self.factor
        elif rho <= 1.0 and capped:
            self.radius *= self.growth
        return self.radius
