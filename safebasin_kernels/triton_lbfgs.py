"""Triton kernels for the two-loop recursion's memory-bound parts (contracts: safebasin_kernels/lbfgs_ops.py).

multi_dot: each program reads its columns of v once and the same columns of all n history rows,
so the whole buffer and v are read exactly once (separate dots read v n times).
lin_comb: each program reads its columns of the n rows (and v) once and writes the output once.
Any strides are taken as they are; arithmetic is fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from safebasin.kernels.triton_common import pad

# Elements of the history tile one program holds per step (n_pad x block columns).
_TILE = 8192
# At most this many programs: each loops over its span, so the partial sums stay few.
_MAX_PROGRAMS = 2048


@triton.jit
def _multi_dot_kernel(v_ptr, b_ptr, out_ptr, n, P, span, sv, sb0, sb1, N_PAD: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    rows = tl.arange(0, N_PAD)
    row_ok = rows < n
    acc = tl.zeros((N_PAD,), dtype=tl.float32)
    first = pid.to(tl.int64) * span
    last = tl.minimum(first + span, P)
    for c0 in range(first, last, BLOCK):
        cols = c0 + tl.arange(0, BLOCK).to(tl.int64)
        col_ok = cols < last
        v = tl.load(v_ptr + cols * sv, mask=col_ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + rows[:, None].to(tl.int64) * sb0 + cols[None, :] * sb1,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(b * v[None, :], axis=1)
    tl.store(out_ptr + pid * n + rows, acc, mask=row_ok)


@triton.jit
def _lin_comb_kernel(c_ptr, b_ptr, v_ptr, out_ptr, v_coeff, n, P, sb0, sb1, sv, HAS_V: tl.constexpr,
                     N_PAD: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.arange(0, N_PAD)
    row_ok = rows < n
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < P
    coef = tl.load(c_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + rows[:, None].to(tl.int64) * sb0 + cols[None, :] * sb1,
                mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    out = tl.sum(b * coef[:, None], axis=0)
    if HAS_V:
        out += v_coeff * tl.load(v_ptr + cols * sv, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + cols, out, mask=col_ok)


def _block(n: int, block: int | None) -> tuple[int, int]:
    n_pad = pad(n, floor=1)
    return n_pad, block or max(16, _TILE // n_pad)


def multi_dot(v: torch.Tensor, basis: torch.Tensor, *, block: int | None = None,
              max_programs: int = _MAX_PROGRAMS) -> torch.Tensor:
    n, P = basis.shape
    if n == 0 or P == 0:
        return torch.zeros(n, dtype=torch.float32, device=basis.device)
    n_pad, block = _block(n, block)
    span = triton.cdiv(triton.cdiv(P, block), max_programs) * block
    programs = triton.cdiv(P, span)
    part = torch.empty(programs, n, dtype=torch.float32, device=basis.device)
    _multi_dot_kernel[(programs,)](v, basis, part, n, P, span, v.stride(0), *basis.stride(), N_PAD=n_pad, BLOCK=block)
    return part.sum(0)


def lin_comb(coeffs: torch.Tensor, basis: torch.Tensor, v: torch.Tensor | None, v_coeff: float, *,
             block: int | None = None) -> torch.Tensor:
    n, P = basis.shape
    out = torch.empty(P, dtype=torch.float32, device=basis.device)
    if P == 0:
        return out
    n_pad, block = _block(n, block)
    coeffs = coeffs.to(torch.float32).contiguous()
    has_v = v is not None
    _lin_comb_kernel[(triton.cdiv(P, block),)](coeffs, basis, v if has_v else out, out, v_coeff, n, P,
                                               *basis.stride(), v.stride(0) if has_v else 0,
                                               HAS_V=has_v, N_PAD=n_pad, BLOCK=block)
    return out
