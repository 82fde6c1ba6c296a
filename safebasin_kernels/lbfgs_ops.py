"""Memory-bound pieces of the L-BFGS two-loop recursion, each one pass over the history rows:
a Triton kernel for CUDA tensors (safebasin_kernels/triton_lbfgs.py), this PyTorch reference otherwise
(safebasin_kernels/backend.py decides). Results are fp32 whatever the storage dtype."""

from __future__ import annotations

import torch

from safebasin.kernels import backend


def _check(basis: torch.Tensor, v: torch.Tensor | None, name: str) -> None:
    if basis.dim() != 2:
        raise ValueError(f"basis must be (n, P), got shape {tuple(basis.shape)}")
    if v is not None and (v.dim() != 1 or v.shape[0] != basis.shape[1]):
        raise ValueError(f"{name} must be a vector of P = {basis.shape[1]} values, got shape {tuple(v.shape)}")


def multi_dot(v: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """All inner products <basis[i], v> in one pass: basis is (n, P), v is (P,). fp32 result."""
    _check(basis, v, "v")
    if backend.use_triton(v, basis):
        from safebasin.kernels import triton_lbfgs
        return triton_lbfgs.multi_dot(v, basis)
    if basis.dtype != torch.float32:
        # Row by row: basis.float() would make an fp32 copy of the whole (half-precision) history.
        v = v.float()
        return torch.stack([row.float() @ v for row in basis]) if len(basis) else v.new_zeros(0)
    # A GEMV reads each basis element once; on CPU it runs at stream bandwidth (benchmarks/kernel_bench.py).
    return basis @ v.float()


def lin_comb(coeffs: torch.Tensor, basis: torch.Tensor, v: torch.Tensor | None = None,
             v_coeff: float = 0.0) -> torch.Tensor:
    """sum_i coeffs[i] * basis[i] (+ v_coeff * v), accumulated in fp32."""
    _check(basis, v, "v")
    if coeffs.shape != (basis.shape[0],):
        raise ValueError(f"coeffs must hold n = {basis.shape[0]} values, got shape {tuple(coeffs.shape)}")
    if backend.use_triton(coeffs, basis, v):
        from safebasin.kernels import triton_lbfgs
        return triton_lbfgs.lin_comb(coeffs, basis, v, float(v_coeff))
    if basis.dtype != torch.float32:
        # Row by row, accumulated in fp32, for the same reason as in multi_dot.
        out = torch.zeros(basis.shape[1], dtype=torch.float32, device=basis.device) if v is None \
            else v.float() * float(v_coeff)
        for c, row in zip(coeffs.tolist(), basis):
            out.add_(row.float(), alpha=c)
        return out
    coeffs, basis_t = coeffs.float(), basis.T
    if v is None:
        return basis_t @ coeffs
    # addmv adds v_coeff * v inside the GEMV: no product temporary and no second pass over P
    # (1.5x faster than `coeffs @ basis + v_coeff * v` at P = 21M, benchmarks/RESULTS.md).
    return torch.addmv(v.float(), basis_t, coeffs, beta=float(v_coeff))
