"""Kernels: the PyTorch references against the dense formulas (float64, C materialised), the
sharded penalty on 2 gloo ranks against the dense one, every Triton kernel under the Triton
interpreter against the references (in a subprocess: TRITON_INTERPRET must be set before
triton is imported), and the backend switch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safebasin.kernels import (
    anchor_penalty,
    anchor_penalty_full,
    anchor_penalty_sharded,
    backend,
    lin_comb,
    multi_dot,
)
from safebasin.kernels.anchor_ops import (
    anchor_penalty_full_reference,
    anchor_penalty_reference,
)
from safebasin.launcher.launch import free_port

REPO = Path(__file__).resolve().parents[1]
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
# (d_out, d_in, r, k): d_out != d_in, odd sizes.
SHAPES = [(13, 7, 3, 5), (24, 41, 6, 9), (37, 29, 1, 36)]


# Kernel-level cases: the two anchors (outside region), the L2 control (an empty basis, C = 0)
# and the aligned control (inside region, with safelora's unequal c to test the c^2 weights).
VARIANTS = ["safelora", "projector", "l2", "aligned"]


def region_of(variant: str) -> str:
    return "inside" if variant == "aligned" else "outside"


def make_anchor(d_out: int, k: int, variant: str, gen: torch.Generator):
    """(U, c) from the SVD of a random alignment direction V (d_out x d_v), float64."""
    V = torch.randn(d_out, d_out + 3, generator=gen, dtype=torch.float64)
    U, S, _ = torch.linalg.svd(V, full_matrices=False)
    if variant == "l2":  # no basis: C = 0
        return U[:, :0].contiguous(), S[:0]
    if variant in ("safelora", "aligned"):  # C = V V^T / ||V||_F restricted to the top-k directions
        return U[:, :k].contiguous(), S[:k] ** 2 / torch.linalg.norm(V)
    assert k < d_out, "the projector variant needs k < rank"
    return U[:, :k].contiguous(), torch.ones(k, dtype=torch.float64)


def dense_C(U, c):
    return U @ torch.diag(c) @ U.T


def dense_penalty_and_grads(DeltaW_of, params, U, c, region="outside"):
    """||(I - C) DeltaW||^2 (or ||C DeltaW||^2 inside) with C materialised, and its gradients by
    autograd (float64)."""
    params = [p.detach().double().requires_grad_(True) for p in params]
    C = dense_C(U.double(), c.double())
    M = C if region == "inside" else torch.eye(U.shape[0], dtype=torch.float64) - C
    penalty = (M @ DeltaW_of(*params)).pow(2).sum()
    return penalty.detach(), torch.autograd.grad(penalty, params)


def penalty_and_grads(fn, params, *rest):
    params = [p.detach().clone().requires_grad_(True) for p in params]
    penalty = fn(*params, *rest)
    return penalty.detach(), torch.autograd.grad(penalty, params)


def lora_inputs(d_out, d_in, r, k, variant, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    U, c = make_anchor(d_out, k, variant, gen)
    B = torch.randn(d_out, r, generator=gen, dtype=torch.float64)
    # Put part of B inside span(U), as alignment-anchored updates are, so (I - C) matters.
    B = B + U @ torch.randn(U.shape[1], r, generator=gen, dtype=torch.float64)
    A = torch.randn(r, d_in, generator=gen, dtype=torch.float64)
    return B.to(dtype), A.to(dtype), U.to(dtype), c.to(dtype)


def full_inputs(d_out, d_in, k, variant, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    U, c = make_anchor(d_out, k, variant, gen)
    W0 = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    W = W0 + 0.1 * torch.randn(d_out, d_in, generator=gen, dtype=torch.float64) + U @ torch.randn(
        U.shape[1], d_in, generator=gen, dtype=torch.float64)
    return W.to(dtype), W0.to(dtype), U.to(dtype), c.to(dtype)


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv(backend.ENV, "torch")


# -- (a) references against the dense formulas -----------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_lora_reference_matches_dense(shape, variant, torch_backend):
    d_out, d_in, r, k = shape
    B, A, U, c = lora_inputs(d_out, d_in, r, k, variant)
    region = region_of(variant)
    want, (want_dB, want_dA) = dense_penalty_and_grads(lambda B, A: B @ A, (B, A), U, c, region)
    got, (dB, dA) = penalty_and_grads(anchor_penalty, (B, A), U, c, region)
    assert want > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    torch.testing.assert_close(dB, want_dB, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(dA, want_dA, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_full_reference_matches_dense(shape, variant, torch_backend):
    d_out, d_in, _, k = shape
    W, W0, U, c = full_inputs(d_out, d_in, k, variant)
    region = region_of(variant)
    want, (want_dW,) = dense_penalty_and_grads(lambda W: W - W0, (W,), U, c, region)
    got, (dW,) = penalty_and_grads(anchor_penalty_full, (W,), W0, U, c, region)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    torch.testing.assert_close(dW, want_dW, rtol=1e-9, atol=1e-10)
    # Non-contiguous W (a transposed view) gives the same.
    got_t, (dW_t,) = penalty_and_grads(anchor_penalty_full, (W.T.contiguous().T,), W0, U, c, region)
    torch.testing.assert_close(got_t, want, rtol=1e-10, atol=0)
    torch.testing.assert_close(dW_t, want_dW, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_stack_of_lora_layers_is_the_sum_of_its_layers(variant, torch_backend):
    """anchor_penalty_metrics on L same-shape layers stacked: the sum of the per-layer penalties
    (values and every layer's gradients, as the dense formula gives them), the outside energy
    over all of U's columns and ||B A||^2, in one call."""
    from safebasin.kernels import anchor_penalty_metrics
    d_out, d_in, r, k = 24, 41, 6, 9
    region = region_of(variant)
    layers = [lora_inputs(d_out, d_in, r, k, "safelora" if variant == "l2" else variant, seed=s) for s in range(3)]
    if variant == "l2":
        layers = [(B, A, U, c[:0]) for B, A, U, c in layers]
    B, A, U, c = (torch.stack(t) for t in zip(*layers))
    Bp, Ap = B.clone().requires_grad_(True), A.clone().requires_grad_(True)
    penalty, outside, energy = anchor_penalty_metrics(Bp, Ap, U, c, region)
    dB, dA = torch.autograd.grad(penalty, (Bp, Ap))
    want = want_out = want_e = 0.0
    for i, (b, a, u, ci) in enumerate(layers):
        p_i, (db, da) = dense_penalty_and_grads(lambda B, A: B @ A, (b, a), u[:, :ci.numel()], ci, region)
        torch.testing.assert_close(dB[i], db, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(dA[i], da, rtol=1e-9, atol=1e-10)
        D = b @ a
        want, want_out, want_e = want + p_i, want_out + (D - u @ (u.T @ D)).pow(2).sum(), want_e + D.pow(2).sum()
    torch.testing.assert_close(penalty.detach(), want, rtol=1e-10, atol=0)
    torch.testing.assert_close(outside, want_out, rtol=1e-9, atol=0)
    torch.testing.assert_close(energy, want_e, rtol=1e-10, atol=0)
    # One layer, unstacked, gives that layer's share.
    one = anchor_penalty_metrics(*layers[0][:3], layers[0][3], region)
    torch.testing.assert_close(one[2], (layers[0][0] @ layers[0][1]).pow(2).sum(), rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="stack of L = 3 layers needs"):
        anchor_penalty_metrics(B, A, U[:2], c, region)


@pytest.mark.parametrize("variant", VARIANTS)
def test_full_metrics_come_from_one_pass(variant, torch_backend, monkeypatch):
    """anchor_penalty_full_metrics: the penalty over U's first c.numel() columns (value and
    gradient as anchor_penalty_full), the energy outside span(U) over all of U's columns and
    ||DeltaW||^2, with W, W0 and U read by one moments pass forward and one gradient pass."""
    from safebasin.kernels import anchor_penalty_full_metrics, torch_anchor
    W, W0, U, c = full_inputs(24, 41, 9, "safelora" if variant == "l2" else variant)
    if variant == "l2":  # the control: no penalty columns, but a basis for the outside share
        c = c[:0]
    kc = c.numel()
    region = region_of(variant)
    calls = {"fragment_moments": 0, "fragment_grad": 0}
    for name in calls:
        real = getattr(torch_anchor, name)

        def counted(*args, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(*args, **kw)
        monkeypatch.setattr(torch_anchor, name, counted)
    w = W.clone().requires_grad_(True)
    penalty, outside, energy = anchor_penalty_full_metrics(w, W0, U, c, region)
    (dW,) = torch.autograd.grad(penalty, w)
    assert calls == {"fragment_moments": 1, "fragment_grad": 1}
    want, (want_dW,) = dense_penalty_and_grads(lambda W: W - W0, (W,), U[:, :kc], c, region)
    D = W - W0
    torch.testing.assert_close(penalty.detach(), want, rtol=1e-10, atol=0)
    torch.testing.assert_close(dW, want_dW, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(outside, (D - U @ (U.T @ D)).pow(2).sum(), rtol=1e-10, atol=0)
    torch.testing.assert_close(energy, D.pow(2).sum(), rtol=1e-12, atol=0)
    assert not (outside.requires_grad or energy.requires_grad)
    with pytest.raises(ValueError, match="at most k = 9"):
        anchor_penalty_full_metrics(w, W0, U, torch.ones(10, dtype=U.dtype))


def test_fp32_and_bf16_inputs_accumulate_in_fp32(torch_backend):
    B, A, U, c = lora_inputs(37, 29, 5, 8, "safelora")
    want = anchor_penalty(B, A, U, c)
    for dtype, rtol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        got, (dB, dA) = penalty_and_grads(anchor_penalty, (B.to(dtype), A.to(dtype)), U.to(dtype), c.to(dtype))
        assert got.dtype == torch.float32 and dB.dtype == dA.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=0)


def test_single_fragment_is_the_full_penalty(torch_backend):
    W, W0, U, c = full_inputs(23, 17, 6, "safelora")
    penalty, grad = anchor_penalty_sharded(W.flatten(), W0.flatten(), 0, (23, 17), U, c)
    want, (want_dW,) = dense_penalty_and_grads(lambda W: W - W0, (W,), U, c)
    torch.testing.assert_close(penalty, want, rtol=1e-10, atol=0)
    torch.testing.assert_close(grad, want_dW.flatten(), rtol=1e-9, atol=1e-10)


SHARD_SHAPE, SHARD_CUT = (23, 17), 200  # 200 = 11 rows + 13: both fragments meet mid-row


def _shard_rank(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **{backend.ENV: "torch"})
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = []
        for variant in VARIANTS:
            W, W0, U, c = full_inputs(*SHARD_SHAPE, 6, variant)
            bounds = [0, SHARD_CUT, W.numel()]
            lo, hi = bounds[rank], bounds[rank + 1]
            penalty, grad = anchor_penalty_sharded(W.flatten()[lo:hi], W0.flatten()[lo:hi], lo, SHARD_SHAPE, U, c,
                                                   region=region_of(variant))
            results.append((float(penalty), grad.numpy()))
        queue.put((rank, results))
    finally:
        dist.destroy_process_group()



@pytest.mark.multiproc
def test_sharded_penalty_on_two_ranks_matches_dense():
    import torch.multiprocessing as mp
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_shard_rank, args=(2, free_port(), queue), nprocs=2, join=True)
    results = dict(queue.get() for _ in range(2))
    for i, variant in enumerate(VARIANTS):
        W, W0, U, c = full_inputs(*SHARD_SHAPE, 6, variant)
        want, (want_dW,) = dense_penalty_and_grads(lambda W: W - W0, (W,), U, c, region_of(variant))
        assert results[0][i][0] == pytest.approx(float(want), rel=1e-10)
        assert results[1][i][0] == pytest.approx(float(want), rel=1e-10)
        grad = torch.cat([torch.from_numpy(results[r][i][1]) for r in (0, 1)])
        assert grad.numel() == W.numel()
        torch.testing.assert_close(grad, want_dW.flatten(), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lbfgs_references(dtype, torch_backend):
    gen = torch.Generator().manual_seed(3)
    basis = torch.randn(7, 301, generator=gen, dtype=torch.float64)
    v, coeffs = torch.randn(301, generator=gen, dtype=torch.float64), torch.randn(7, generator=gen, dtype=torch.float64)
    b, vv = basis.to(dtype), v.to(dtype)  # dense formulas on the rounded values
    tol = dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(multi_dot(vv, b).double(), b.double() @ vv.double(), **tol)
    torch.testing.assert_close(lin_comb(coeffs.float(), b, vv, -0.5).double(),
                               coeffs.float().double() @ b.double() - 0.5 * vv.double(), **tol)
    torch.testing.assert_close(lin_comb(coeffs.float(), b).double(), coeffs.float().double() @ b.double(), **tol)


# -- (b) every Triton kernel under the interpreter, against the references ------------------

def test_triton_kernels_interpreted():
    """Runs TestInterpreted in a TRITON_INTERPRET=1 subprocess and shows its report on failure."""
    if INTERPRETER:
        pytest.skip("this process already runs the interpreter: TestInterpreted runs here directly")
    env = {k: v for k, v in os.environ.items() if k != backend.ENV}
    env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                           f"{Path(__file__)}::TestInterpreted"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=540)
    report = proc.stdout[-8000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, report
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, report


# Small blocks, so that every kernel sees several row/column blocks, several k blocks, row
# splits and masked edges at these small odd sizes.
SMALL = dict(block_m=16, block_k=16)
DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 1e-4)]


def _odd_layouts(gen, d_out, d_in, r, k, dtype):
    """B, A, U as non-contiguous views (strided slices, transposes) of random values."""
    B = torch.randn(d_out, 2 * r, generator=gen).to(dtype)[:, ::2]
    A = torch.randn(d_in, r, generator=gen).to(dtype).T
    U = torch.linalg.qr(torch.randn(d_out, k, generator=gen))[0].to(dtype).T.contiguous().T
    return B, A, U


@pytest.mark.skipif(not INTERPRETER, reason="run by test_triton_kernels_interpreted in a TRITON_INTERPRET=1 "
                                            "subprocess (TRITON_INTERPRET must be set before triton's import)")
class TestInterpreted:
    @pytest.fixture(autouse=True)
    def _triton(self, monkeypatch):
        monkeypatch.setenv(backend.ENV, "triton")

    @pytest.mark.parametrize("dtype,rtol", DTYPES)
    def test_lora_pieces(self, dtype, rtol):
        from safebasin.kernels import torch_anchor as ref
        from safebasin.kernels import triton_anchor as tri
        gen = torch.Generator().manual_seed(4)
        d_out, d_in, r, k = 45, 37, 5, 21
        B, A, U = _odd_layouts(gen, d_out, d_in, r, k, dtype)
        assert not (B.is_contiguous() or A.is_contiguous() or U.is_contiguous())
        M, G = torch.randn(k, r, generator=gen), torch.randn(r, r, generator=gen)
        tol = dict(rtol=rtol, atol=rtol)
        torch.testing.assert_close(tri.ut_y(U, B, **SMALL), ref.ut_y(U, B), **tol)
        for got, want in zip(tri.row_moments(B, U, M, **SMALL), ref.row_moments(B, U, M)):
            torch.testing.assert_close(got, want, **tol)
        torch.testing.assert_close(tri.row_apply(B, U, M, G, **SMALL), ref.row_apply(B, U, M, G), **tol)
        torch.testing.assert_close(tri.gram(A, block_n=16), ref.gram(A), **tol)
        torch.testing.assert_close(tri.left_mul(G, A, block_n=16), ref.left_mul(G, A), **tol)

    @pytest.mark.parametrize("dtype,rtol", DTYPES)
    @pytest.mark.parametrize("start,n", [(0, 45 * 37), (50, 400), (37 * 44 + 3, 34)])
    def test_fragment_pieces(self, dtype, rtol, start, n):
        from safebasin.kernels import torch_anchor as ref
        from safebasin.kernels import triton_anchor as tri
        gen = torch.Generator().manual_seed(5)
        shape, k = (45, 37), 21
        w = torch.randn(2 * n, generator=gen).to(dtype)[::2]  # strided fragments
        w0 = torch.randn(n, generator=gen).to(dtype)
        U = _odd_layouts(gen, shape[0], shape[1], 1, k, dtype)[2]
        M, scale = torch.randn(k, shape[1], generator=gen), torch.tensor(-1.5)
        tol = dict(rtol=rtol, atol=rtol)
        # programs=4 forces row splits whose partial sums must add up.
        for got, want in zip(tri.fragment_moments(w, w0, start, shape, U, block_n=16, programs=4, **SMALL),
                             ref.fragment_moments(w, w0, start, shape, U)):
            torch.testing.assert_close(got, want, **tol)
        for coef in (1.0, 0.0):  # 0: the aligned control's gradient has no D term
            torch.testing.assert_close(tri.fragment_grad(w, w0, start, shape, U, M, scale, coef, block_n=16, **SMALL),
                                       ref.fragment_grad(w, w0, start, shape, U, M, scale, coef), **tol)
        # The tensor-core setting of the full form's dots (fp32-level error) computes the same.
        for got, want in zip(tri.fragment_moments(w, w0, start, shape, U, block_n=16, programs=4, precision="tf32x3",
                                                  **SMALL), ref.fragment_moments(w, w0, start, shape, U)):
            torch.testing.assert_close(got, want, **tol)
        torch.testing.assert_close(tri.fragment_grad(w, w0, start, shape, U, M, scale, 1.0, block_n=16,
                                                     precision="tf32x3", **SMALL),
                                   ref.fragment_grad(w, w0, start, shape, U, M, scale, 1.0), **tol)
        with pytest.raises(ValueError, match="precision 'tf32'.*'ieee', 'tf32x3'"):
            tri.fragment_grad(w, w0, start, shape, U, M, scale, precision="tf32")

    @pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
    @pytest.mark.parametrize("variant", VARIANTS)
    def test_penalties_and_gradients(self, variant, dtype, rtol, monkeypatch):
        """The public functions, forced onto Triton, against the same functions on the reference."""
        region = region_of(variant)
        B, A, U, c = lora_inputs(45, 37, 5, 21, variant, dtype=dtype)
        got, grads = penalty_and_grads(anchor_penalty, (B, A), U, c, region)
        want, want_grads = penalty_and_grads(anchor_penalty_reference, (B, A), U, c, region)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)  # same rounded inputs, fp32 sums
        for g, w in zip(grads, want_grads):
            assert g.dtype == dtype
            torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * w.abs().max().item())
        W, W0, U, c = full_inputs(45, 37, 21, variant, dtype=dtype)
        got, (dW,) = penalty_and_grads(anchor_penalty_full, (W.T.contiguous().T,), W0, U, c, region)
        want, (want_dW,) = penalty_and_grads(anchor_penalty_full_reference, (W,), W0, U, c, region)
        # P = ||D||^2 - (the part in span U): fp32 rounding scales with ||D||^2, not with P.
        energy_tol = 1e-6 * (W.double() - W0.double()).pow(2).sum().item()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=energy_tol)
        torch.testing.assert_close(dW, want_dW, rtol=rtol, atol=rtol * want_dW.abs().max().item())
        from safebasin.kernels import anchor_penalty_full_metrics
        got_m = anchor_penalty_full_metrics(W, W0, U, c[:c.numel() // 2], region)
        with monkeypatch.context() as patch:
            patch.setenv(backend.ENV, "torch")
            want_m = anchor_penalty_full_metrics(W, W0, U, c[:c.numel() // 2], region)
        for g, w in zip(got_m, want_m):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=energy_tol)
        for lo, hi in ((0, 700), (700, W.numel())):  # fragments meeting mid-row
            args = (W.flatten()[lo:hi], W0.flatten()[lo:hi], lo, (45, 37), U, c)
            got_p, got_g = anchor_penalty_sharded(*args, region=region)
            with monkeypatch.context() as patch:
                patch.setenv(backend.ENV, "torch")
                want_p, want_g = anchor_penalty_sharded(*args, region=region)
            torch.testing.assert_close(got_p, want_p, rtol=1e-5, atol=energy_tol)
            torch.testing.assert_close(got_g, want_g, rtol=1e-5, atol=1e-5 * want_g.abs().max().item())

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_multi_dot_and_lin_comb(self, dtype):
        from safebasin.kernels import triton_lbfgs as tri
        gen = torch.Generator().manual_seed(6)
        n, P = 7, 1013
        store = torch.randn(n + 3, P + 5, generator=gen).to(dtype)
        basis = store[2:2 + n, 1:1 + P]  # rows of a larger buffer: row stride P + 5
        v = torch.randn(2 * P, generator=gen).to(dtype)[::2]
        coeffs = torch.randn(n, generator=gen)
        want_dots = basis.double() @ v.double()
        tol = dict(rtol=1e-5, atol=1e-4)
        # block 64, 4 programs: each program loops over several blocks, the last one partial.
        torch.testing.assert_close(tri.multi_dot(v, basis, block=64, max_programs=4).double(), want_dots, **tol)
        torch.testing.assert_close(multi_dot(v, basis).double(), want_dots, **tol)
        want = coeffs.double() @ basis.double()
        torch.testing.assert_close(tri.lin_comb(coeffs, basis, v, 0.25, block=64).double(),
                                   want + 0.25 * v.double(), **tol)
        torch.testing.assert_close(lin_comb(coeffs, basis).double(), want, **tol)
        torch.testing.assert_close(lin_comb(coeffs[:0], basis[:0], v, 2.0).double(), 2.0 * v.double(), **tol)
        assert multi_dot(v, basis[:0]).shape == (0,)

    def test_forced_triton_refuses_what_it_cannot_take(self):
        B, A, U, c = lora_inputs(13, 7, 3, 5, "safelora")  # float64
        with pytest.raises(TypeError, match="float64.*SAFEBASIN_KERNEL_BACKEND=torch"):
            anchor_penalty(B, A, U, c)
        B, A, U, c = (t.float()[None] for t in lora_inputs(13, 7, 3, 5, "safelora"))
        with pytest.raises(ValueError, match="stack of layers runs on the reference pieces"):
            anchor_penalty(B, A, U, c)
        B, A, U, c = lora_inputs(13, 7, backend.MAX_RANK + 1, 5, "safelora", dtype=torch.float32)
        with pytest.raises(ValueError, match="rank 129"):
            anchor_penalty(B, A, U, c)


# -- (c) the backend switch ----------------------------------------------------------------

def test_invalid_backend_value_names_variable_and_choices(monkeypatch):
    monkeypatch.setenv(backend.ENV, "cuda")
    B, A, U, c = lora_inputs(13, 7, 3, 5, "safelora", dtype=torch.float32)
    with pytest.raises(ValueError, match=r"SAFEBASIN_KERNEL_BACKEND='cuda'.*auto, triton, torch"):
        anchor_penalty(B, A, U, c)
    with pytest.raises(ValueError, match="SAFEBASIN_KERNEL_BACKEND"):
        multi_dot(torch.ones(3), torch.ones(2, 3))


def test_auto_and_torch_keep_cpu_on_the_reference(monkeypatch):
    from safebasin.kernels import anchor_ops, torch_anchor
    x = torch.ones(3)
    for value in ("auto", "torch", " AUTO ", ""):
        monkeypatch.setenv(backend.ENV, value)
        assert backend.use_triton(x) is False
        assert anchor_ops._pieces(x) is torch_anchor
    monkeypatch.delenv(backend.ENV)
    assert backend.requested() == "auto"


@pytest.mark.skipif(INTERPRETER, reason="the interpreter is on in this process")
def test_forced_triton_on_cpu_without_interpreter_says_how_to_fix(monkeypatch):
    monkeypatch.setenv(backend.ENV, "triton")
    B, A, U, c = lora_inputs(13, 7, 3, 5, "safelora", dtype=torch.float32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        anchor_penalty(B, A, U, c)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        lin_comb(torch.ones(2), torch.ones(2, 3))
