"""Fused math for safebasin: each operation is one function that dispatches between a
PyTorch reference (CPU, and the ground truth in tests) and a Triton kernel (CUDA)."""

from safebasin.kernels.anchor_ops import (
    anchor_penalty,
    anchor_penalty_full,
    anchor_penalty_full_metrics,
    anchor_penalty_metrics,
    anchor_penalty_sharded,
)
from safebasin.kernels.lbfgs_ops import lin_comb, multi_dot

__all__ = ["anchor_penalty", "anchor_penalty_full", "anchor_penalty_full_metrics", "anchor_penalty_metrics",
           "anchor_penalty_sharded",
           "multi_dot", "lin_comb"]
