"""PyTorch reference pieces of the anchor penalty: the CPU path and the ground truth the Triton
pieces (safebasin_kernels/triton_anchor.py, same names and contracts) are tested against.

Arithmetic runs in fp32 for half-precision inputs; fp64 stays fp64. The LoRA pieces also take
a stack of same-shape layers (a leading layer dimension: matmuls broadcast over it), which is
how a trainer takes all its adapted layers in a few launches instead of a few per layer.
"""

from __future__ import annotations

import torch


def acc(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t in the accumulation dtype for inputs like `like`: fp32, or fp64 for fp64."""
    return t.to(torch.promote_types(like.dtype, torch.float32))


def ut_y(U: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """U^T Y (k x r)."""
    return acc(U, Y).mT @ acc(Y, Y)


def row_moments(B: torch.Tensor, U: torch.Tensor, M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(X^T X, U^T X) for X = B - U M."""
    Uf = acc(U, B)
    X = acc(B, B) - Uf @ M.to(Uf.dtype)
    return X.mT @ X, Uf.mT @ X


def row_apply(B: torch.Tensor, U: torch.Tensor, M: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """B G - U M (d_out x r)."""
    Uf = acc(U, B)
    return acc(B, B) @ G.to(Uf.dtype) - Uf @ M.to(Uf.dtype)


def gram(A: torch.Tensor) -> torch.Tensor:
    """A A^T (r x r)."""
    Af = acc(A, A)
    return Af @ Af.mT


def left_mul(G: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """G A (r x d_in)."""
    Af = acc(A, A)
    return G.to(Af.dtype) @ Af


def _window_rows(w: torch.Tensor, w0: torch.Tensor, start: int, shape: tuple[int, int]):
    """(D over the rows [row0, row1) the fragment touches, zero outside it; row0; offset of the
    fragment's first element in that window)."""
    d_in = shape[1]
    n = w.numel()
    row0, row1 = start // d_in, (start + n - 1) // d_in + 1
    offset = start - row0 * d_in
    D = acc(w, w).reshape(-1) - acc(w0, w).reshape(-1)
    if offset or n != (row1 - row0) * d_in:
        padded = torch.zeros((row1 - row0) * d_in, dtype=D.dtype, device=D.device)
        padded[offset:offset + n] = D
        D = padded
    return D.view(row1 - row0, d_in), row0, offset


def fragment_moments(w: torch.Tensor, w0: torch.Tensor, start: int, shape: tuple[int, int],
                     U: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U^T D, ||D||^2) over the fragment's elements of D = W - W0, where w, w0 hold elements
    [start, start + n) of the row-major W, W0 (n > 0)."""
    D, row0, _ = _window_rows(w, w0, start, shape)
    U_rows = acc(U, w)[row0:row0 + D.shape[0]]
    return U_rows.T @ D, D.pow(2).sum()


def fragment_grad(w: torch.Tensor, w0: torch.Tensor, start: int, shape: tuple[int, int], U: torch.Tensor,
                  M: torch.Tensor, scale: torch.Tensor, delta_coef: float = 1.0) -> torch.Tensor:
    """scale * (delta_coef D - U M) at the fragment's elements, flat (n)."""
    D, row0, offset = _window_rows(w, w0, start, shape)
    U_rows = acc(U, w)[row0:row0 + D.shape[0]]
    out = scale.to(D.dtype) * (delta_coef * D - U_rows @ M.to(D.dtype))
    return out.reshape(-1)[offset:offset + w.numel()]
