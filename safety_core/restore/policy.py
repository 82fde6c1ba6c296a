"""The trust region on the step of restoration: its radius and the rule that moves it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrustRegion:
    """radius: the largest L2 norm a step may have. After each try, `update` shrinks it when
    the retain loss moved much more than predicted (rho < shrink_below) or the step was
    rejected, and grows it when the prediction held (rho > grow_above) on a step that was
    clipped to the boundary."""

    radius: float
    shrink_below: float = 0.25
    grow_above: float = 0.75
    factor: float = 4.0       # shrink by this
    growth: float = 2.0       # grow by this

    def clip(self, norm: float) -> tuple[float, bool]:
        """(the step norm to take for a proposed norm, whether it was clipped to the radius)."""
        return min(norm, self.radius), norm >= self.radius

    def update(self, step_norm: float, rho: float, accepted: bool, on_boundary: bool) -> float:
        if not accepted:
            # Shrink below the step just tried: a radius left above a short step would retry it.
            self.radius = min(self.radius, step_norm) / self.factor
        elif rho < self.shrink_below:
            self.radius /= self.factor
        elif rho > self.grow_above and on_boundary:
            self.radius *= self.growth
        return self.radius
