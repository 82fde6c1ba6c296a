"""The anchor penalty ||(I - C) DeltaW||_F^2 with C = U diag(c) U^T, in the three forms the
trainer needs (DESIGN.md, Anchoring), and its two controls: `region="inside"` gives
||C DeltaW||_F^2 (the AsFT paper's reverse control), and an empty basis (k = 0, C = 0) gives
plain L2, ||DeltaW||_F^2. None of them forms a d_out x d_out matrix: C only ever acts through
U^T (k x d_out) products.

    LoRA (DeltaW = B A):     P = sum((X^T X) * (A A^T)),  X = (I - C) B = B - U (c * T),  T = U^T B
                             dP/dB = 2 (I - C) X (A A^T) = 2 (B G_A - U (c * ((T + U^T X) G_A)))
                             dP/dA = 2 (X^T X) A
    full (DeltaW = W - W0):  P = ||DeltaW||^2 - sum_i (2 c_i - c_i^2) ||u_i^T DeltaW||^2
                             dP/dW = 2 (DeltaW - U ((2c - c^2) * (U^T DeltaW)))
  inside (||C DeltaW||^2 = sum_i c_i^2 ||u_i^T DeltaW||^2, U orthonormal):
    LoRA                     P = sum((T_c^T T_c) * (A A^T)),  T_c = c * T
                             dP/dB = 2 U (c * (T_c G_A)),  dP/dA = 2 (T_c^T T_c) A
    full                     P = sum_i c_i^2 ||T_i||^2,  dP/dW = 2 U (c^2 * (U^T DeltaW))

Both regions of the full form are one formula, P = s ||DeltaW||^2 + sum_i w_i ||u_i^T DeltaW||^2
with (s, w) = (1, c^2 - 2c) outside and (0, c^2) inside, so they share every piece. The LoRA
outside form keeps X = (I - C) B rather than expanding it: the expansion subtracts two close
energies when the update lies mostly in span(U).

The LoRA form also takes a stack of same-shape layers (B: L x d_out x r, A: L x r x d_in, U:
L x d_out x k, c: L x k) and returns the sum over them: one autograd node and a few batched
launches for all of a model's q (or k, ...) layers, where a loop over layers would launch a
few dozen small kernels per layer (host-bound on a GPU). Stacks run on the reference pieces.

The math is written once here over "pieces" (U^T Y, the row moments of X, ...) that stream
the large operands; each piece exists as a Triton kernel (triton_anchor) and a PyTorch
reference (torch_anchor), and safebasin_kernels/backend.py picks one per call. The LoRA form reads U and
B twice and A once forward, U, B and A once more backward (U^T X, taken with X^T X in the
same pass, saves the backward a reduction over rows).

Arithmetic runs in fp32 for half-precision inputs (fp64 stays fp64, on the reference);
gradients are cast back to the input dtype.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.distributed as dist

from safebasin.kernels import backend, torch_anchor


def _pieces(*tensors: torch.Tensor, unsupported: str | None = None) -> ModuleType:
    if backend.use_triton(*tensors, unsupported=unsupported):
        from safebasin.kernels import triton_anchor
        return triton_anchor
    return torch_anchor


class _LoraPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, B, A, U, c, ops):
        T = ops.ut_y(U, B)
        cf = c.to(T.dtype)
        gram_x, ux = ops.row_moments(B, U, cf[..., None] * T)
        gram_a = ops.gram(A)
        ctx.save_for_backward(B, A, U, cf, T, ux, gram_x, gram_a)
        ctx.ops = ops
        return (gram_x * gram_a).sum()

    @staticmethod
    def backward(ctx, grad_out):
        B, A, U, cf, T, ux, gram_x, gram_a = ctx.saved_tensors
        # 2 * grad_out goes into the small r x r / k x r factors, never over a large operand.
        two_g = 2 * grad_out.to(T.dtype)
        dB = dA = None
        if ctx.needs_input_grad[0]:
            G = two_g * gram_a
            dB = ctx.ops.row_apply(B, U, cf[..., None] * ((T + ux) @ G), G).to(B.dtype)
        if ctx.needs_input_grad[1]:
            dA = ctx.ops.left_mul(two_g * gram_x, A).to(A.dtype)
        return dB, dA, None, None, None


class _LoraInsidePenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, B, A, U, c, ops):
        T = ops.ut_y(U, B)
        Tc = c.to(T.dtype)[..., None] * T
        gram_c = Tc.mT @ Tc                      # r x r: (C B)^T (C B) for orthonormal U
        gram_a = ops.gram(A)
        ctx.save_for_backward(B, A, U, c.to(Tc.dtype), Tc, gram_c, gram_a)
        ctx.ops = ops
        return (gram_c * gram_a).sum()

    @staticmethod
    def backward(ctx, grad_out):
        B, A, U, cf, Tc, gram_c, gram_a = ctx.saved_tensors
        two_g = 2 * grad_out.to(Tc.dtype)
        dB = dA = None
        if ctx.needs_input_grad[0]:
            # row_apply forms B G - U M; G = 0 leaves -U M, so M carries the minus sign.
            M = -(cf[..., None] * (Tc @ (two_g * gram_a)))
            dB = ctx.ops.row_apply(B, U, M, torch.zeros_like(gram_a)).to(B.dtype)
        if ctx.needs_input_grad[1]:
            dA = ctx.ops.left_mul(two_g * gram_c, A).to(A.dtype)
        return dB, dA, None, None, None


REGIONS = ("outside", "inside")


def _terms(c: torch.Tensor, like: torch.Tensor, region: str) -> tuple[float, torch.Tensor]:
    """(s, w) of P = s ||DeltaW||^2 + sum_i w_i ||u_i^T DeltaW||^2 for the region."""
    c = c.to(like.dtype)
    if region == "inside":
        return 0.0, c * c
    return 1.0, c * c - 2 * c


def _from_moments(T: torch.Tensor, sq: torch.Tensor, c: torch.Tensor, region: str
                  ) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]:
    """From T = U^T DeltaW over all k columns of U (orthonormal) and sq = ||DeltaW||^2: (the
    penalty over U's first c.numel() columns in `region`, the energy outside span(U)
    ||(I - U U^T) DeltaW||^2, and the penalty's (s, w), which its gradient takes). The one place
    the full form's value is formed, for whole weights and for ZeRO-3 fragments alike."""
    kc = c.numel()
    row_sq = T.pow(2).sum(dim=1)
    s, weight = _terms(c, T, region)
    return s * sq + (weight * row_sq[:kc]).sum(), sq - row_sq.sum(), s, weight


class _FullPenalty(torch.autograd.Function):
    """(penalty, outside energy, ||DeltaW||^2) from one pass over W, W0 and U; only the penalty
    is differentiable. Its gradient needs U^T DeltaW complete (a sum over every row) before any
    of its elements, so the backward reads W, W0 and U once more and writes dW: two passes
    per step are the least an exact gradient can take (benchmarks/RESULTS.md, roofline)."""

    @staticmethod
    def forward(ctx, W, W0, U, c, ops, region):
        w, w0 = W.reshape(-1), W0.reshape(-1)  # row-major; copies only a non-contiguous W
        T, sq = ops.fragment_moments(w, w0, 0, tuple(W.shape), U)
        penalty, outside, s, weight = _from_moments(T, sq, c, region)
        kc = c.numel()
        ctx.save_for_backward(w, w0, U[:, :kc], weight, T[:kc])
        ctx.ops, ctx.shape, ctx.w_dtype, ctx.s = ops, tuple(W.shape), W.dtype, s
        ctx.mark_non_differentiable(outside, sq)
        return penalty, outside, sq

    @staticmethod
    def backward(ctx, grad_out, _outside, _sq):
        w, w0, U, weight, T = ctx.saved_tensors
        # dP/dW = 2 (s D + U (w * T)) = 2 (s D - U M) with M = -(w * T).
        dW = ctx.ops.fragment_grad(w, w0, 0, ctx.shape, U, -weight[:, None] * T, 2 * grad_out, ctx.s)
        return dW.view(ctx.shape).to(ctx.w_dtype), None, None, None, None, None


def _check(U: torch.Tensor, c: torch.Tensor, d_out: int, region: str = "outside", prefix: bool = False) -> None:
    """prefix: c weights the first c.numel() columns of U (the rest serve the outside metric)."""
    if region not in REGIONS:
        raise ValueError(f"region must be one of {REGIONS}, got {region!r}")
    if U.dim() != 2 or U.shape[0] != d_out:
        raise ValueError(f"U must be d_out x k with d_out = {d_out}, got {tuple(U.shape)}")
    if c.dim() != 1 or not (c.shape[0] <= U.shape[1] if prefix else c.shape[0] == U.shape[1]):
        raise ValueError(f"c must hold {'at most ' if prefix else ''}k = {U.shape[1]} values, got {tuple(c.shape)}")


def _check_lora(B: torch.Tensor, A: torch.Tensor, U: torch.Tensor, c: torch.Tensor, region: str,
                prefix: bool = False) -> None:
    """One layer (2-D B, A, U; 1-D c) or a stack of L layers (each with a leading L)."""
    if B.dim() not in (2, 3) or A.dim() != B.dim() or B.shape[-1] != A.shape[-2]:
        raise ValueError(f"B (d_out x r) and A (r x d_in), or stacks of them (L x ...), do not chain: "
                         f"{tuple(B.shape)}, {tuple(A.shape)}")
    if B.dim() == 3:
        if not (A.shape[0] == U.shape[0] == c.shape[0] == B.shape[0]) or U.dim() != 3 or c.dim() != 2:
            raise ValueError(f"a stack of L = {B.shape[0]} layers needs A (L x r x d_in), U (L x d_out x k) "
                             f"and c (L x k); got {tuple(A.shape)}, {tuple(U.shape)}, {tuple(c.shape)}")
        _check(U[0], c[0], B.shape[1], region, prefix)
    else:
        _check(U, c, B.shape[0], region, prefix)


def _lora_unsupported(B: torch.Tensor) -> str | None:
    """Why the Triton pieces cannot take these factors, or None."""
    if B.dim() == 3:
        return "a stack of layers runs on the reference pieces (batched matmuls)"
    return backend.rank_limit(B.shape[1])


def _check_full(W: torch.Tensor, W0: torch.Tensor, U: torch.Tensor, c: torch.Tensor, region: str,
                prefix: bool = False) -> None:
    if W.shape != W0.shape or W.dim() != 2:
        raise ValueError(f"W and W0 must be equal 2-D shapes, got {tuple(W.shape)}, {tuple(W0.shape)}")
    _check(U, c, W.shape[0], region, prefix)


def _lora(B, A, U, c, ops, region):
    fn = _LoraInsidePenalty if region == "inside" else _LoraPenalty
    return fn.apply(B, A, U, c, ops)


def anchor_penalty(B: torch.Tensor, A: torch.Tensor, U: torch.Tensor, c: torch.Tensor,
                   region: str = "outside") -> torch.Tensor:
    """||(I - U diag(c) U^T) B A||_F^2 (region "outside"; with k = 0 plain ||B A||_F^2) or
    ||U diag(c) U^T B A||_F^2 (region "inside") for B (d_out x r), A (r x d_in); differentiable
    in B and A (closed-form backward). Triton for CUDA tensors, the reference otherwise
    (safebasin_kernels/backend.py)."""
    _check_lora(B, A, U, c, region)
    ops = _pieces(B, A, U, c, unsupported=_lora_unsupported(B))
    return _lora(B, A, U, c, ops, region)


def anchor_penalty_metrics(B: torch.Tensor, A: torch.Tensor, U: torch.Tensor, c: torch.Tensor,
                           region: str = "outside") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(anchor_penalty over U's first c.shape[-1] columns, differentiable in B and A; the energy of
    B A outside span(U) over all of U's columns, ||(I - U U^T) B A||^2; ||B A||^2), for one layer
    or a stack (all three summed over it). The metrics reuse the penalty's pieces on small
    factors (k x r, r x r), so they cost a few launches, not a second penalty."""
    _check_lora(B, A, U, c, region, prefix=True)
    ops = _pieces(B, A, U, c, unsupported=_lora_unsupported(B))
    kc = c.shape[-1]
    penalty = _lora(B, A, U[..., :kc], c, ops, region)
    with torch.no_grad():
        # X' = (I - U U^T) B kept unexpanded, as the penalty's X (no cancellation of energies).
        gram_out, _ = ops.row_moments(B, U, ops.ut_y(U, B))
        gram_a, gram_b = ops.gram(A), ops.gram(B.mT)
        outside, energy = (gram_out * gram_a).sum(), (gram_b * gram_a).sum()
    return penalty, outside, energy


def anchor_penalty_full(W: torch.Tensor, W0: torch.Tensor, U: torch.Tensor, c: torch.Tensor,
                        region: str = "outside") -> torch.Tensor:
    """||(I - U diag(c) U^T)(W - W0)||_F^2 (or ||U diag(c) U^T (W - W0)||_F^2 inside),
    differentiable in W."""
    _check_full(W, W0, U, c, region)
    return _FullPenalty.apply(W, W0, U, c, _pieces(W, W0, U, c), region)[0]


def anchor_penalty_full_metrics(W: torch.Tensor, W0: torch.Tensor, U: torch.Tensor, c: torch.Tensor,
                                region: str = "outside") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the penalty of anchor_penalty_full over U's first c.numel() columns, differentiable in W;
    the update's energy outside span(U) over all of U's columns; ||W - W0||^2), all three from
    one pass over W, W0 and U (U orthonormal for the second). What a trainer logs beside the
    penalty costs no second read of the weights."""
    _check_full(W, W0, U, c, region, prefix=True)
    return _FullPenalty.apply(W, W0, U, c, _pieces(W, W0, U, c), region)


def anchor_penalty_reference(B: torch.Tensor, A: torch.Tensor, U: torch.Tensor, c: torch.Tensor,
                             region: str = "outside") -> torch.Tensor:
    """anchor_penalty on the PyTorch reference whatever the backend setting."""
    _check_lora(B, A, U, c, region)
    return _lora(B, A, U, c, torch_anchor, region)


def anchor_penalty_full_reference(W: torch.Tensor, W0: torch.Tensor, U: torch.Tensor, c: torch.Tensor,
                                  region: str = "outside") -> torch.Tensor:
    """anchor_penalty_full on the PyTorch reference whatever the backend setting."""
    _check_full(W, W0, U, c, region)
    return _FullPenalty.apply(W, W0, U, c, torch_anchor, region)[0]


def sharded_partials(w: torch.Tensor, w0: torch.Tensor, start: int, shape: tuple[int, int],
                     U: torch.Tensor) -> torch.Tensor:
    """This rank's share of [vec(U^T DeltaW), ||DeltaW||^2] (k x d_in + 1 floats) for a weight of
    `shape` whose row-major flattening is split across ranks, this rank holding elements
    [start, start + w.numel()) of W (w) and of W0 (w0). U^T DeltaW is a sum over rows (a
    fragment may begin and end mid-row), so the shares of all ranks sum to the whole; several
    layers' shares can go in one all-reduce."""
    d_out, d_in = shape
    _check(U, U.new_ones(U.shape[1]), d_out)
    n = w.numel()
    if w0.numel() != n or start < 0 or start + n > d_out * d_in:
        raise ValueError(f"fragment [{start}, {start + n}) with {w0.numel()} initial values does not "
                         f"fit a {d_out} x {d_in} weight")
    w, w0 = w.reshape(-1), w0.reshape(-1)
    out = torch.zeros(U.shape[1] * d_in + 1, dtype=torch.promote_types(w.dtype, torch.float32), device=w.device)
    if n:
        T, sq = _pieces(w, w0, U).fragment_moments(w, w0, start, shape, U)
        out[:-1] = T.flatten()
        out[-1] = sq
    return out


def sharded_penalty_from(reduced: torch.Tensor, w: torch.Tensor, w0: torch.Tensor, start: int,
                         shape: tuple[int, int], U: torch.Tensor, c: torch.Tensor, region: str = "outside"
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """From the rank-summed partials of one layer (taken with all k columns of U): (the penalty
    over the first c.numel() columns in `region`, the energy outside span(U)
    ||(I - U U^T) DeltaW||^2, the energy ||DeltaW||^2, dP/dw for this rank's fragment). The
    metrics come from the same reduction as the penalty (U orthonormal)."""
    d_out, d_in = shape
    kc = c.numel()
    penalty_U = U[:, :kc]
    _check(penalty_U, c, d_out, region)
    T = reduced[:-1].view(U.shape[1], d_in)
    sq = reduced[-1]
    penalty, outside, s, weight = _from_moments(T, sq, c, region)
    w, w0 = w.reshape(-1), w0.reshape(-1)
    if not w.numel():
        return penalty, outside, sq, torch.zeros(0, dtype=reduced.dtype, device=w.device)
    scale = torch.tensor(2.0, dtype=reduced.dtype, device=w.device)
    grad = _pieces(w, w0, penalty_U, c).fragment_grad(w, w0, start, shape, penalty_U,
                                                       -weight[:, None] * T[:kc], scale, s)
    return penalty, outside, sq, grad


def anchor_penalty_sharded(w: torch.Tensor, w0: torch.Tensor, start: int, shape: tuple[int, int],
                           U: torch.Tensor, c: torch.Tensor, group=None,
                           region: str = "outside") -> tuple[torch.Tensor, torch.Tensor]:
    """The full-parameter penalty of one weight split across ranks (see sharded_partials): one
    all-reduce of k x d_in + 1 floats completes U^T DeltaW and ||DeltaW||^2, and each rank then
    forms the gradient of its own elements. Returns (the global penalty, dP/dw for this
    fragment), both exact; every rank of `group` must call it (an empty fragment included).
    The trainer reduces all anchored layers of a step at once with the two halves directly."""
    _check(U, c, shape[0], region)
    reduced = sharded_partials(w, w0, start, shape, U)
    if dist.is_initialized():
        dist.all_reduce(reduced, group=group)
    penalty, _, _, grad = sharded_penalty_from(reduced, w, w0, start, shape, U, c, region)
    return penalty, grad
