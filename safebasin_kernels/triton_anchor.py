"""Triton pieces of the anchor penalty (same names and contracts as safebasin_kernels/torch_anchor.py).

Every piece streams its large operands once and returns fp32 results; inputs may be fp32,
bf16 or fp16 and any 2-D strides (no copy). Reductions over rows are written as one partial
per program and summed by torch afterwards: deterministic, unlike atomics, and the partials
are k x r or k x d_in floats per program, small next to the streamed operands.

LoRA (B: d_out x r, A: r x d_in, U: d_out x k):
  ut_y          U^T Y                        one pass over rows of U, Y
  row_moments   X = B - U M; X^T X, U^T X    one pass over rows of U, B (X never stored)
  row_apply     B G - U M                    one pass over rows of U, B
  gram          A A^T                        one pass over columns of A
  left_mul      G A                          one pass over columns of A
Full / fragment (a flat row-major slice [start, start + n) of W and W0):
  fragment_moments   U^T D and ||D||^2 over the rows the fragment touches, D = W - W0
  fragment_grad      scale (delta_coef D - U M) for the fragment's elements
An empty basis (k = 0: the L2 control) launches no U work: ut_y returns zeros, the loops over
k run no iteration, and fragment_moments still runs one k block for ||D||^2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from safebasin.kernels.triton_common import pad

# tl.dot on fp32 would otherwise use TF32 on GPUs (10-bit mantissa); the LoRA form's dots are
# small, so exact fp32 costs nothing measurable there.
_IEEE: tl.constexpr = tl.constexpr("ieee")
# The full form's two passes do 2k FLOPs per element of W (4k per step over 20 bytes): at k = 64,
# exact fp32 dots run on CUDA cores, whose peak puts the ridge point at about the step's own
# FLOP per byte (benchmarks/RESULTS.md, roofline). "tf32x3" (three TF32 products, fp32-level
# error) moves them to tensor cores; the device run times both (gpu_scale.py, kernel section)
# before the default changes.
FULL_PRECISIONS = ("ieee", "tf32x3")
FULL_PRECISION = "ieee"


@triton.jit
def _ut_y_kernel(u_ptr, y_ptr, out_ptr, d, k, r, su0, su1, sy0, sy1,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    kc = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.arange(0, R_PAD)
    row_ok, k_ok, r_ok = rows < d, kc < k, rr < r
    u = tl.load(u_ptr + rows[:, None] * su0 + kc[None, :] * su1, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    y = tl.load(y_ptr + rows[:, None] * sy0 + rr[None, :] * sy1, mask=row_ok[:, None] & r_ok[None, :], other=0.0)
    t = tl.dot(tl.trans(u.to(tl.float32)), y.to(tl.float32), input_precision=_IEEE)
    tl.store(out_ptr + pid * k * r + kc[:, None] * r + rr[None, :], t, mask=k_ok[:, None] & r_ok[None, :])


@triton.jit
def _rows_kernel(b_ptr, u_ptr, m_ptr, g_ptr, x_ptr, gram_ptr, ux_ptr, d, k, r, sb0, sb1, su0, su1,
                 HAS_G: tl.constexpr, WRITE_X: tl.constexpr, MOMENTS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr):
    """X = B (G) - U M for a block of rows; then store X, or its partial X^T X and U^T X."""
    pid = tl.program_id(0)
    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rr = tl.arange(0, R_PAD)
    kk = tl.arange(0, BLOCK_K)
    row_ok, r_ok = rows < d, rr < r
    x = tl.load(b_ptr + rows[:, None] * sb0 + rr[None, :] * sb1, mask=row_ok[:, None] & r_ok[None, :],
                other=0.0).to(tl.float32)
    if HAS_G:
        g = tl.load(g_ptr + rr[:, None] * r + rr[None, :], mask=r_ok[:, None] & r_ok[None, :], other=0.0)
        x = tl.dot(x, g, input_precision=_IEEE)
    for k0 in range(0, k, BLOCK_K):
        kc = k0 + kk
        k_ok = kc < k
        u = tl.load(u_ptr + rows[:, None] * su0 + kc[None, :] * su1, mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)
        m = tl.load(m_ptr + kc[:, None] * r + rr[None, :], mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        x -= tl.dot(u, m, input_precision=_IEEE)
    if WRITE_X:
        tl.store(x_ptr + rows[:, None] * r + rr[None, :], x, mask=row_ok[:, None] & r_ok[None, :])
    if MOMENTS:
        # Rows past d loaded as zeros, so they add nothing to either moment.
        gram = tl.dot(tl.trans(x), x, input_precision=_IEEE)
        tl.store(gram_ptr + pid * r * r + rr[:, None] * r + rr[None, :], gram, mask=r_ok[:, None] & r_ok[None, :])
        for k0 in range(0, k, BLOCK_K):
            kc = k0 + kk
            k_ok = kc < k
            # The same rows as above, read again from cache rather than held for every k.
            u = tl.load(u_ptr + rows[:, None] * su0 + kc[None, :] * su1, mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0).to(tl.float32)
            ux = tl.dot(tl.trans(u), x, input_precision=_IEEE)
            tl.store(ux_ptr + pid * k * r + kc[:, None] * r + rr[None, :], ux, mask=k_ok[:, None] & r_ok[None, :])


@triton.jit
def _cols_kernel(a_ptr, g_ptr, out_ptr, r, n, sa0, sa1, GRAM: tl.constexpr,
                 BLOCK_N: tl.constexpr, R_PAD: tl.constexpr):
    """For a block of columns of A: the partial A A^T (GRAM), or G A."""
    pid = tl.program_id(0)
    cols = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rr = tl.arange(0, R_PAD)
    r_ok, col_ok = rr < r, cols < n
    a = tl.load(a_ptr + rr[:, None] * sa0 + cols[None, :] * sa1, mask=r_ok[:, None] & col_ok[None, :],
                other=0.0).to(tl.float32)
    if GRAM:
        gram = tl.dot(a, tl.trans(a), input_precision=_IEEE)
        tl.store(out_ptr + pid * r * r + rr[:, None] * r + rr[None, :], gram, mask=r_ok[:, None] & r_ok[None, :])
    else:
        g = tl.load(g_ptr + rr[:, None] * r + rr[None, :], mask=r_ok[:, None] & r_ok[None, :], other=0.0)
        out = tl.dot(g, a, input_precision=_IEEE)
        tl.store(out_ptr + rr[:, None] * n + cols[None, :], out, mask=r_ok[:, None] & col_ok[None, :])


@triton.jit
def _fragment_tile(w_ptr, w0_ptr, rows, cols, row_end, start, n, d_in, sw, sw0):
    """D = w - w0 at window rows x columns; zero outside the fragment [start, start + n)."""
    flat = rows[:, None] * d_in + cols[None, :] - start
    ok = (rows < row_end)[:, None] & (cols < d_in)[None, :] & (flat >= 0) & (flat < n)
    w = tl.load(w_ptr + flat * sw, mask=ok, other=0.0).to(tl.float32)
    w0 = tl.load(w0_ptr + flat * sw0, mask=ok, other=0.0).to(tl.float32)
    return w - w0, flat, ok


@triton.jit
def _fragment_moments_kernel(w_ptr, w0_ptr, u_ptr, t_ptr, sq_ptr, start, n, d_in, row0, row_end, rows_per_split,
                             k, sw, sw0, su0, su1,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             PRECISION: tl.constexpr):
    """Program (column block, row split, k block): partial U^T D over its rows, and (first k
    block only) the partial column sums of D^2."""
    pid_n, pid_s, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    kc = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = kc < k
    first = row0 + pid_s * rows_per_split
    last = tl.minimum(first + rows_per_split, row_end)
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(first, last, BLOCK_M):
        rows = (r0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        dlt, flat, ok = _fragment_tile(w_ptr, w0_ptr, rows, cols, last, start, n, d_in, sw, sw0)
        u = tl.load(u_ptr + rows[:, None] * su0 + kc[None, :] * su1, mask=(rows < last)[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.dot(tl.trans(u), dlt, input_precision=PRECISION)
        sq += tl.sum(dlt * dlt, axis=0)
    col_ok = cols < d_in
    tl.store(t_ptr + pid_s * k * d_in + kc[:, None] * d_in + cols[None, :], acc, mask=k_ok[:, None] & col_ok[None, :])
    if pid_k == 0:
        tl.store(sq_ptr + pid_s * d_in + cols, sq, mask=col_ok)


@triton.jit
def _fragment_grad_kernel(w_ptr, w0_ptr, u_ptr, m_ptr, scale_ptr, out_ptr, start, n, d_in, row0, row_end, k,
                          delta_coef, sw, sw0, su0, su1,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          PRECISION: tl.constexpr):
    rows = (row0 + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    dlt, flat, ok = _fragment_tile(w_ptr, w0_ptr, rows, cols, row_end, start, n, d_in, sw, sw0)
    dlt = dlt * delta_coef
    kk = tl.arange(0, BLOCK_K)
    row_ok, col_ok = rows < row_end, cols < d_in
    for k0 in range(0, k, BLOCK_K):
        kc = k0 + kk
        k_ok = kc < k
        u = tl.load(u_ptr + rows[:, None] * su0 + kc[None, :] * su1, mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)
        m = tl.load(m_ptr + kc[:, None] * d_in + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        dlt -= tl.dot(u, m, input_precision=PRECISION)
    scale = tl.load(scale_ptr)
    tl.store(out_ptr + flat, scale * dlt, mask=ok)


# -- host wrappers ------------------------------------------------------------------------

def _f32(t: torch.Tensor) -> torch.Tensor:
    """Small host-side operands (M, G: k x r, r x r, k x d_in) as contiguous fp32."""
    return t.to(torch.float32).contiguous()


def ut_y(U: torch.Tensor, Y: torch.Tensor, *, block_m: int = 64, block_k: int = 64) -> torch.Tensor:
    d, k = U.shape
    r = Y.shape[1]
    if k == 0:
        return torch.zeros(0, r, dtype=torch.float32, device=U.device)
    block_k = min(block_k, pad(k))
    grid = (triton.cdiv(d, block_m), triton.cdiv(k, block_k))
    part = torch.zeros(grid[0], k, r, dtype=torch.float32, device=U.device)
    _ut_y_kernel[grid](U, Y, part, d, k, r, *U.stride(), *Y.stride(),
                       BLOCK_M=block_m, BLOCK_K=block_k, R_PAD=pad(r))
    return part.sum(0)


def _rows(B, U, M, G, moments: bool, block_m: int | None, block_k: int):
    d, r = B.shape
    k = U.shape[1]
    r_pad = pad(r)
    # The X block (block_m x r_pad fp32) lives in registers next to U's block.
    block_m = block_m or (64 if r_pad <= 32 else 32)
    block_k = min(block_k, pad(k))
    grid = (triton.cdiv(d, block_m),)
    dev = B.device
    M = _f32(M)
    has_g = G is not None
    G = _f32(G) if has_g else M  # an unused pointer when HAS_G is off
    if moments:
        X = M  # unused pointer
        gram = torch.empty(grid[0], r, r, dtype=torch.float32, device=dev)
        ux = torch.empty(grid[0], k, r, dtype=torch.float32, device=dev)
    else:
        X = torch.empty(d, r, dtype=torch.float32, device=dev)
        gram = ux = M
    _rows_kernel[grid](B, U, M, G, X, gram, ux, d, k, r, *B.stride(), *U.stride(),
                       HAS_G=has_g, WRITE_X=not moments, MOMENTS=moments,
                       BLOCK_M=block_m, BLOCK_K=block_k, R_PAD=r_pad)
    return (gram.sum(0), ux.sum(0)) if moments else X


def row_moments(B: torch.Tensor, U: torch.Tensor, M: torch.Tensor, *, block_m: int | None = None,
                block_k: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    return _rows(B, U, M, None, True, block_m, block_k)


def row_apply(B: torch.Tensor, U: torch.Tensor, M: torch.Tensor, G: torch.Tensor, *, block_m: int | None = None,
              block_k: int = 64) -> torch.Tensor:
    return _rows(B, U, M, G, False, block_m, block_k)


def gram(A: torch.Tensor, *, block_n: int = 128) -> torch.Tensor:
    r, n = A.shape
    grid = (triton.cdiv(n, block_n),)
    part = torch.empty(grid[0], r, r, dtype=torch.float32, device=A.device)
    _cols_kernel[grid](A, part, part, r, n, *A.stride(), GRAM=True, BLOCK_N=block_n, R_PAD=pad(r))
    return part.sum(0)


def left_mul(G: torch.Tensor, A: torch.Tensor, *, block_n: int = 128) -> torch.Tensor:
    r, n = A.shape
    out = torch.empty(r, n, dtype=torch.float32, device=A.device)
    _cols_kernel[(triton.cdiv(n, block_n),)](A, _f32(G), out, r, n, *A.stride(), GRAM=False,
                                             BLOCK_N=block_n, R_PAD=pad(r))
    return out


def _precision(value: str | None) -> str:
    value = FULL_PRECISION if value is None else value
    if value not in FULL_PRECISIONS:
        raise ValueError(f"precision {value!r}: allowed values {FULL_PRECISIONS}")
    return value


def _window(start: int, n: int, d_in: int) -> tuple[int, int]:
    """The rows [row0, row_end) that elements [start, start + n) of a row-major weight touch."""
    return start // d_in, (start + n - 1) // d_in + 1


def fragment_moments(w: torch.Tensor, w0: torch.Tensor, start: int, shape: tuple[int, int], U: torch.Tensor, *,
                     block_m: int = 32, block_n: int = 64, block_k: int = 64,
                     programs: int = 512, precision: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    d_in = shape[1]
    n = w.numel()
    k = U.shape[1]
    row0, row_end = _window(start, n, d_in)
    block_k = min(block_k, pad(k))
    # At least one k block: the first one also sums ||D||^2, which an empty basis still needs.
    cols, kblocks = triton.cdiv(d_in, block_n), max(1, triton.cdiv(k, block_k))
    # Split the rows among programs until there are enough of them to fill the device.
    row_blocks = triton.cdiv(row_end - row0, block_m)
    splits = max(1, min(row_blocks, triton.cdiv(programs, cols * kblocks)))
    rows_per_split = triton.cdiv(row_blocks, splits) * block_m
    splits = triton.cdiv(row_end - row0, rows_per_split)
    T = torch.empty(splits, k, d_in, dtype=torch.float32, device=w.device)
    sq = torch.empty(splits, d_in, dtype=torch.float32, device=w.device)
    _fragment_moments_kernel[(cols, splits, kblocks)](
        w, w0, U, T, sq, start, n, d_in, row0, row_end, rows_per_split, k, w.stride(0), w0.stride(0), *U.stride(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=_precision(precision))
    return T.sum(0), sq.sum()


def fragment_grad(w: torch.Tensor, w0: torch.Tensor, start: int, shape: tuple[int, int], U: torch.Tensor,
                  M: torch.Tensor, scale: torch.Tensor, delta_coef: float = 1.0, *, block_m: int = 32,
                  block_n: int = 64, block_k: int = 64, precision: str | None = None) -> torch.Tensor:
    d_in = shape[1]
    n = w.numel()
    k = U.shape[1]
    row0, row_end = _window(start, n, d_in)
    out = torch.empty(n, dtype=torch.float32, device=w.device)
    grid = (triton.cdiv(row_end - row0, block_m), triton.cdiv(d_in, block_n))
    _fragment_grad_kernel[grid](w, w0, U, _f32(M), _f32(scale.reshape(1)), out, start, n, d_in, row0, row_end, k,
                                float(delta_coef), w.stride(0), w0.stride(0), *U.stride(),
                                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=min(block_k, pad(k)),
                                PRECISION=_precision(precision))
    return out
