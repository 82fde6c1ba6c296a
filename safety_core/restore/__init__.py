"""Curvature-aware safety restoration: the four disjoint data sets, the flattened parameter
spaces (replicated and ZeRO-3), the sharded L-BFGS buffer, the trust-region policy and the loop.

May import: train/ (data, models, DeepSpeed config), the shared modules (args, distributed,
precision, zero3, nll) and kernels.
"""
