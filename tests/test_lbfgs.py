"""The sharded L-BFGS buffer against dense BFGS, exact quadratics, its filter, and 2 real ranks."""

import os

import pytest
import torch
from safebasin.launcher.launch import free_port
from safebasin.safety_core.restore.lbfgs import (
    CurvatureBuffer,
    shard_range,
    two_loop_coefficients,
)

F64 = torch.float64


def spd(n: int, seed: int, cond: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, n, dtype=F64, generator=gen)
    return q @ q.T / n + cond * torch.eye(n, dtype=F64)


def random_pairs(n: int, k: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pairs of a noisy quadratic: <s, y> > 0 but no exact shared Hessian, as in real training."""
    gen = torch.Generator().manual_seed(seed)
    a = spd(n, seed + 1)
    pairs = []
    for _ in range(k):
        s = torch.randn(n, dtype=F64, generator=gen)
        pairs.append((s, a @ s + 0.1 * torch.randn(n, dtype=F64, generator=gen)))
    return pairs


def dense_bfgs(pairs, g: torch.Tensor) -> torch.Tensor:
    """H g from H0 = gamma I and H <- (I - rho s y^T) H (I - rho y s^T) + rho s s^T, oldest first."""
    s_new, y_new = pairs[-1]
    eye = torch.eye(g.numel(), dtype=F64)
    h = (s_new @ y_new) / (y_new @ y_new) * eye
    for s, y in pairs:
        rho = 1.0 / (s @ y)
        h = (eye - rho * torch.outer(s, y)) @ h @ (eye - rho * torch.outer(y, s)) + rho * torch.outer(s, s)
    return h @ g


def rounded(pairs, dtype=torch.float32):
    """The pairs as the buffer stores them, back in float64 for the dense reference."""
    return [(s.to(dtype).double(), y.to(dtype).double()) for s, y in pairs]


def test_shard_range_is_balanced_and_covers_everything():
    for numel, world in ((10, 3), (7, 2), (2, 4), (0, 2), (1_000_003, 8)):
        ranges = [shard_range(numel, r, world) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == numel
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        sizes = [e - s for s, e in ranges]
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        shard_range(10, 2, 2)


def test_scalar_recursion_equals_dense_bfgs_float64():
    n, k = 12, 6
    pairs = random_pairs(n, k, seed=0)
    g = torch.randn(n, dtype=F64, generator=torch.Generator().manual_seed(9))
    s = torch.stack([p[0] for p in pairs])
    y = torch.stack([p[1] for p in pairs])
    a, b, c = two_loop_coefficients(s @ s.T, s @ y.T, y @ y.T, s @ g, y @ g)
    torch.testing.assert_close(a @ s + b @ y + c * g, dense_bfgs(pairs, g), rtol=1e-10, atol=1e-12)


def test_buffer_direction_equals_dense_bfgs():
    n, k = 40, 7
    pairs = random_pairs(n, k, seed=1)
    g = torch.randn(n, dtype=F64, generator=torch.Generator().manual_seed(2))
    buf = CurvatureBuffer(history=10)
    assert all(buf.push(s.float(), y.float()) for s, y in pairs)
    d = buf.apply_inverse(g.float())
    assert d.dtype == torch.float32 and d.shape == (n,)
    ref = dense_bfgs(rounded(pairs), g.float().double())
    torch.testing.assert_close(d.double(), ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    # The scalars the trust region uses match the vectors they describe.
    info = buf.last_info
    assert info.g_dot_d == pytest.approx(float(d.double() @ g), rel=1e-4)
    assert info.d_norm_sq == pytest.approx(float(d.double() @ d.double()), rel=1e-4)
    assert info.g_norm_sq == pytest.approx(float(g @ g), rel=1e-5)


def test_bf16_storage_matches_dense_bfgs_of_the_stored_pairs():
    n, k = 64, 5
    pairs = random_pairs(n, k, seed=3)
    g = torch.randn(n, dtype=F64, generator=torch.Generator().manual_seed(4))
    buf = CurvatureBuffer(history=5, dtype=torch.bfloat16)
    for s, y in pairs:
        assert buf.push(s.float(), y.float())
    assert buf.nbytes == 2 * 5 * n * 2
    ref = dense_bfgs(rounded(pairs, torch.bfloat16), g.float().double())
    torch.testing.assert_close(buf.apply_inverse(g.float()).double(), ref, rtol=1e-4,
                               atol=1e-5 * ref.abs().max().item())


def test_conjugate_pairs_give_the_exact_inverse():
    n = 16
    a = spd(n, seed=5)
    # Rows s_i with s_i^T A s_j = delta_ij: a random orthonormal basis mapped by L^-T (A = L L^T).
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=torch.Generator().manual_seed(6)))
    s_rows = torch.linalg.solve_triangular(torch.linalg.cholesky(a).T, q, upper=True).T
    buf = CurvatureBuffer(history=n)
    for s in s_rows:
        assert buf.push(s.float(), (a @ s).float())
    g = torch.randn(n, dtype=F64, generator=torch.Generator().manual_seed(7))
    x = torch.linalg.solve(a, g)
    torch.testing.assert_close(buf.apply_inverse(g.float()).double(), x, rtol=1e-4, atol=1e-5)


def test_filter_refuses_low_curvature_and_keeps_newest_m():
    n, m = 20, 3
    pairs = random_pairs(n, 6, seed=8)
    buf = CurvatureBuffer(history=m, threshold=1e-3)
    s0, _ = pairs[0]
    assert not buf.push(s0.float(), -s0.float())                   # negative curvature
    assert not buf.push(s0.float(), torch.zeros(n))                # zero
    tiny = s0 / s0.norm() * 1e-2                                   # <s, y> = 1e-4 <= 1e-3
    assert not buf.push(tiny.float(), tiny.float())
    assert not buf.push(s0.float(), torch.full((n,), float("nan")))
    assert len(buf) == 0 and buf.stats.accepted == 0
    for i, (s, y) in enumerate(pairs):
        assert buf.push(s.float(), y.float())
        assert len(buf) == min(i + 1, m)
        assert not buf.push(s.float(), -y.float())  # refusals in a full buffer evict nothing
    g = torch.randn(n, dtype=F64, generator=torch.Generator().manual_seed(10))
    ref = dense_bfgs(rounded(pairs[-m:]), g.float().double())
    torch.testing.assert_close(buf.apply_inverse(g.float()).double(), ref, rtol=1e-4,
                               atol=1e-5 * ref.abs().max().item())
    buf.reset()
    assert len(buf) == 0
    torch.testing.assert_close(buf.apply_inverse(g.float()), g.float())


def test_empty_buffer_is_identity_and_every_call_reduces_once():
    n, m = 30, 4
    buf = CurvatureBuffer(history=m)
    g = torch.randn(n)
    d = buf.apply_inverse(g)
    assert torch.equal(d, g) and d is not g
    assert (buf.stats.all_reduce_calls, buf.stats.floats_reduced) == (1, 1)
    sizes = []
    for s, y in random_pairs(n, 6, seed=11):
        before = buf.stats.floats_reduced
        buf.push(s.float(), y.float())
        sizes.append(buf.stats.floats_reduced - before)
    # k stored pairs: <s,s>, <s,y>, <y,y> and 4 dots per kept pair; a full buffer skips the evictee.
    assert sizes == [3, 7, 11, 15, 15, 15]
    before = buf.stats.floats_reduced
    buf.apply_inverse(g)
    assert buf.stats.floats_reduced - before == 2 * m + 1
    assert buf.stats.all_reduce_calls == 1 + 6 + 1


def test_size_mismatch_is_a_clear_error():
    buf = CurvatureBuffer()
    with pytest.raises(ValueError, match="differ in size"):
        buf.push(torch.ones(5), torch.ones(6))
    buf.push(torch.ones(5), torch.ones(5))
    with pytest.raises(ValueError, match="fixed by the first push"):
        buf.push(torch.ones(6), torch.ones(6))
    with pytest.raises(ValueError, match="fixed by the first push"):
        buf.apply_inverse(torch.ones(4))
    with pytest.raises(ValueError, match="flat 1-D"):
        buf.apply_inverse(torch.ones(5, 1))
    with pytest.raises(ValueError):
        CurvatureBuffer(history=0)


# -- two real ranks on gloo ---------------------------------------------------------------------

N, M = 37, 4  # odd N: the shards differ in size


def dist_pairs() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Ordinary pairs plus two whose partial <s, y> have opposite signs on the two ranks: one
    positive overall (accept), one negative overall though rank 0's part is positive (refuse)."""
    pairs = random_pairs(N, 6, seed=12)
    (a0, a1), (b0, b1) = shard_range(N, 0, 2), shard_range(N, 1, 2)
    s = torch.randn(N, dtype=F64, generator=torch.Generator().manual_seed(13))
    y = s.clone()
    y[a0:a1] *= -0.5
    y[b0:b1] *= 2.0 + (s[a0:a1] @ s[a0:a1]) / (s[b0:b1] @ s[b0:b1])
    pairs.insert(2, (s, y))
    y = s.clone()
    y[b0:b1] *= -(1.0 + (s[a0:a1] @ s[a0:a1]) / (s[b0:b1] @ s[b0:b1]))
    pairs.insert(4, (s, y))
    return [(s.float(), y.float()) for s, y in pairs]


def _rank_main(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    # Count the collectives actually issued, independently of the buffer's own counters.
    issued = []
    real = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        issued.append(tensor.numel())
        return real(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce
    try:
        start, end = shard_range(N, rank, world)
        buf = CurvatureBuffer(history=M)
        decisions, calls, local_sy = [], [], []
        for s, y in dist_pairs():
            before = len(issued)
            decisions.append(buf.push(s[start:end], y[start:end]))
            calls.append(len(issued) - before)
            local_sy.append(float(s[start:end] @ y[start:end]))
        g = torch.randn(N, generator=torch.Generator().manual_seed(14))
        before = len(issued)
        d = buf.apply_inverse(g[start:end])
        calls.append(len(issued) - before)
        info = buf.last_info
        queue.put((rank, dict(decisions=decisions, calls=calls, local_sy=local_sy, d=d.numpy(),
                              info=(info.g_dot_d, info.d_norm_sq), stats=buf.stats.all_reduce_calls)))
    finally:
        dist.all_reduce = real
        dist.destroy_process_group()



@pytest.mark.multiproc
def test_two_ranks_match_one_rank_and_agree_on_the_filter():
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(_rank_main, args=(2, free_port(), queue), nprocs=2, join=True)
    results = dict(queue.get() for _ in range(2))

    one = CurvatureBuffer(history=M)
    decisions = [one.push(s, y) for s, y in dist_pairs()]
    g = torch.randn(N, generator=torch.Generator().manual_seed(14))
    d_one = one.apply_inverse(g)

    r0, r1 = results[0], results[1]
    # The crafted pairs really do disagree locally, yet every rank takes the global decision.
    assert r0["local_sy"][2] < 0 < r1["local_sy"][2] and decisions[2]
    assert r1["local_sy"][4] < 0 < r0["local_sy"][4] and not decisions[4]
    assert r0["decisions"] == r1["decisions"] == decisions
    assert sum(decisions) > M  # eviction happened under sharding too
    # Exactly one collective per push and per direction, as issued and as counted.
    assert r0["calls"] == r1["calls"] == [1] * (len(decisions) + 1)
    assert r0["stats"] == r1["stats"] == len(decisions) + 1
    d_two = torch.cat([torch.from_numpy(r0["d"]), torch.from_numpy(r1["d"])])
    torch.testing.assert_close(d_two, d_one, rtol=1e-4, atol=1e-5 * d_one.abs().max().item())
    assert r0["info"] == r1["info"]  # identical reduced scalars on every rank
    assert r0["info"][1] == pytest.approx(one.last_info.d_norm_sq, rel=1e-4)
