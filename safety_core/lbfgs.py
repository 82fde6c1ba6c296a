"""The sharded L-BFGS curvature buffer's public path; it lives with restoration, its only user
inside safebasin (restore/lbfgs.py)."""

from safebasin.safety_core.restore.lbfgs import (
    CurvatureBuffer,
    DirectionInfo,
    shard_range,
    two_loop_coefficients,
)

__all__ = ["CurvatureBuffer", "DirectionInfo", "shard_range", "two_loop_coefficients"]
