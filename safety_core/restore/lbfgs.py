"""Sharded, vector-free L-BFGS curvature buffer (Chen, Wang and Zhou 2014).

Each rank holds only its shard of every pair (s_i, y_i). The two-loop recursion needs inner
products alone, so a direction costs one all-reduce of O(m) partial dots; the recursion then
runs on scalars (identically on every rank) and the direction is one local linear combination
of the stored shards and g.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from safebasin.kernels import lin_comb, multi_dot

_STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def shard_range(numel: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of rank's contiguous, balanced slice of a replicated flat vector."""
    if world < 1 or not 0 <= rank < world or numel < 0:
        raise ValueError(f"bad shard request: numel={numel}, rank={rank}, world={world}")
    base, extra = divmod(numel, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


@dataclass
class CommStats:
    """Reductions the buffer asked for. At world size 1 they are counted but run locally."""
    all_reduce_calls: int = 0
    floats_reduced: int = 0
    pushes: int = 0
    accepted: int = 0
    directions: int = 0

    @property
    def bytes_reduced(self) -> int:
        return 4 * self.floats_reduced  # payloads are fp32


@dataclass
class DirectionInfo:
    """Scalars of the last direction d = H g, reduced over all ranks at no extra collective:
    the trust region needs ||d|| and the predicted change <g, d> without touching vectors again."""
    g_dot_d: float
    d_norm_sq: float
    g_norm_sq: float


def two_loop_coefficients(ss: torch.Tensor, sy: torch.Tensor, yy: torch.Tensor,
                          gs: torch.Tensor, gy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The two-loop recursion on scalars. Pairs are ordered oldest to newest; ss[i, j] = <s_i, s_j>,
    sy[i, j] = <s_i, y_j>, yy[i, j] = <y_i, y_j>, gs[i] = <g, s_i>, gy[i] = <g, y_i>.

    Returns (a, b, c) with H g = sum a_i s_i + sum b_i y_i + c g, H the L-BFGS inverse Hessian
    from H0 = gamma I, gamma = <s, y> / <y, y> of the newest pair.
    """
    k = gs.numel()
    a = torch.zeros(k, dtype=torch.float64)
    if k == 0:
        return a, a.clone(), 1.0
    rho = 1.0 / torch.diagonal(sy)
    # First loop: q = g - sum_j alpha_j y_j, so <s_i, q> = <s_i, g> - sum_j alpha_j <s_i, y_j>.
    alpha = torch.zeros(k, dtype=torch.float64)
    for i in range(k - 1, -1, -1):
        alpha[i] = rho[i] * (gs[i] - sy[i] @ alpha)
    gamma = float(sy[k - 1, k - 1] / yy[k - 1, k - 1])
    # r = gamma q: coefficients b on y, c on g; a on s grows in the second loop.
    b = -gamma * alpha
    c = gamma
    for i in range(k):
        y_dot_r = sy[:, i] @ a + yy[i] @ b + c * gy[i]
        a[i] += alpha[i] - rho[i] * y_dot_r
    return a, b, c


class CurvatureBuffer:
    """The newest m curvature pairs, sharded across a process group.

    Storage is one contiguous (2m, P_local) tensor with s_i and y_i interleaved per slot (rows
    2i, 2i+1), so the filled slots are always a contiguous prefix the fused kernels can read in
    one pass. The Gram matrix of the stored vectors lives as float64 scalars indexed by slot.
    """

    def __init__(self, history: int = 10, threshold: float = 1e-6, group=None,
                 dtype: torch.dtype = torch.float32, device: torch.device | None = None):
        if history < 1:
            raise ValueError(f"history must be >= 1, got {history}")
        if dtype not in _STORAGE_DTYPES:
            raise ValueError(f"storage dtype must be one of {_STORAGE_DTYPES}, got {dtype}")
        self.history = history
        self.threshold = threshold
        self.group = group
        self.dtype = dtype
        self.device = device  # storage; None: the device of the first pushed vectors
        self.distributed = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size(group) if self.distributed else 1
        self.stats = CommStats()
        self.last_info: DirectionInfo | None = None
        self._buf: torch.Tensor | None = None  # allocated on the first push: the shard size is known then
        self._gram = torch.zeros(3, history, history, dtype=torch.float64)  # ss, sy, yy by slot
        self._order: list[int] = []  # slots, oldest pair first

    # -- bookkeeping -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._order)

    @property
    def numel(self) -> int | None:
        """P_local, fixed by the first push."""
        return None if self._buf is None else self._buf.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of vector storage on this rank (the O(m^2) scalars are not counted)."""
        return 0 if self._buf is None else self._buf.numel() * self._buf.element_size()

    def curvatures(self) -> list[float]:
        """<s, y> / <s, s> of the kept pairs, oldest first: the Hessian's Rayleigh quotient
        along each probe step (a diagnostic of the pairs' quality)."""
        gss, gsy, _ = self._gram
        return [float(gsy[i, i] / gss[i, i]) for i in self._order]

    def reset(self) -> None:
        """Forget all pairs; the storage (and the shard size it fixes) is kept for reuse."""
        self._order.clear()
        self._gram.zero_()
        self.last_info = None

    def _check(self, name: str, v: torch.Tensor) -> None:
        if v.dim() != 1:
            raise ValueError(f"{name} must be a flat 1-D shard, got shape {tuple(v.shape)}")
        if self._buf is not None and v.numel() != self._buf.shape[1]:
            raise ValueError(f"{name} has {v.numel()} elements but this buffer holds shards of "
                             f"{self._buf.shape[1]} (fixed by the first push)")

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        self.stats.all_reduce_calls += 1
        self.stats.floats_reduced += t.numel()
        if self.world_size > 1:
            # NCCL moves CUDA tensors only: a history kept on the CPU reduces through the GPU.
            on_comm = t
            if dist.get_backend(self.group) == "nccl" and t.device.type != "cuda":
                on_comm = t.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(on_comm, group=self.group)
            if on_comm is not t:
                t.copy_(on_comm)
        return t

    def _view(self) -> torch.Tensor:
        """The filled prefix: rows (s, y) of slots 0..k-1, contiguous."""
        return self._buf[: 2 * len(self._order)]

    # -- the API -----------------------------------------------------------------------------

    def push(self, s: torch.Tensor, y: torch.Tensor) -> bool:
        """Offer a pair (this rank's shards). Accepted iff the global <s, y> > threshold, which
        every rank sees identically; the oldest pair is evicted beyond m. One all-reduce."""
        self._check("s", s)
        self._check("y", y)
        if s.numel() != y.numel():
            raise ValueError(f"s and y differ in size: {s.numel()} vs {y.numel()}")
        if self._buf is None:
            self._buf = torch.empty(2 * self.history, s.numel(), dtype=self.dtype, device=self.device or s.device)
        self.stats.pushes += 1
        # Dots are taken with the vectors as they will be stored, so the Gram stays exact for them.
        s = s.detach().to(self._buf.device, self.dtype)
        y = y.detach().to(self._buf.device, self.dtype)
        k = len(self._order)
        full = k == self.history
        # A full buffer evicts its oldest slot on acceptance (and changes nothing on rejection),
        # so dots against that slot are never needed: they stay out of the payload.
        keep = [slot for slot in range(k) if not (full and slot == self._order[0])]
        rows = torch.tensor([r for slot in keep for r in (2 * slot, 2 * slot + 1)], dtype=torch.long,
                            device=self._buf.device)
        hist = self._view()
        parts = [multi_dot(s, s.unsqueeze(0)), multi_dot(s, y.unsqueeze(0)), multi_dot(y, y.unsqueeze(0))]
        if keep:
            parts += [multi_dot(s, hist).index_select(0, rows), multi_dot(y, hist).index_select(0, rows)]
        dots = self._all_reduce(torch.cat(parts)).double().cpu()
        ss, sy, yy = dots[:3].tolist()
        if not sy > self.threshold:  # also refuses NaN
            return False
        slot = self._order.pop(0) if full else k
        self._buf[2 * slot].copy_(s)
        self._buf[2 * slot + 1].copy_(y)
        n = len(keep)
        s_hist, y_hist = dots[3:3 + 2 * n], dots[3 + 2 * n:]
        gss, gsy, gyy = self._gram
        gss[slot, :] = gss[:, slot] = 0.0
        gsy[slot, :] = gsy[:, slot] = 0.0
        gyy[slot, :] = gyy[:, slot] = 0.0
        if n:
            idx = torch.tensor(keep)
            gss[slot, idx] = gss[idx, slot] = s_hist[0::2]
            gsy[slot, idx] = s_hist[1::2]  # <s_new, y_j>
            gsy[idx, slot] = y_hist[0::2]  # <s_j, y_new>
            gyy[slot, idx] = gyy[idx, slot] = y_hist[1::2]
        gss[slot, slot], gsy[slot, slot], gyy[slot, slot] = ss, sy, yy
        self._order.append(slot)
        self.stats.accepted += 1
        return True

    def apply_inverse(self, g: torch.Tensor) -> torch.Tensor:
        """H g by the two-loop recursion (fp32, this rank's shard); g itself with no pairs.
        One all-reduce of 2k + 1 floats; the scalars of d land in `last_info`."""
        self._check("g", g)
        self.stats.directions += 1
        k = len(self._order)
        g = g.detach() if self._buf is None else g.detach().to(self._buf.device)
        gg_local = multi_dot(g, g.unsqueeze(0))
        parts = [multi_dot(g, self._view()), gg_local] if k else [gg_local]
        dots = self._all_reduce(torch.cat(parts)).double().cpu()
        gg = float(dots[-1])
        if k == 0:
            self.last_info = DirectionInfo(g_dot_d=gg, d_norm_sq=gg, g_norm_sq=gg)
            return g.to(torch.float32, copy=True)
        order = torch.tensor(self._order)
        gss, gsy, gyy = (m[order][:, order] for m in self._gram)
        by_slot = dots[:-1].view(k, 2)  # row slot: (<g, s>, <g, y>)
        gs, gy = by_slot[order, 0], by_slot[order, 1]
        a, b, c = two_loop_coefficients(gss, gsy, gyy, gs, gy)
        # ||d||^2 and <g, d> from the Gram of {s, y, g}: the trust region needs them on every rank.
        g_dot_d = float(a @ gs + b @ gy + c * gg)
        d_norm_sq = float(a @ gss @ a + 2 * a @ gsy @ b + b @ gyy @ b
                          + 2 * c * (a @ gs + b @ gy) + c * c * gg)
        self.last_info = DirectionInfo(g_dot_d=g_dot_d, d_norm_sq=d_norm_sq, g_norm_sq=gg)
        coeffs = torch.empty(k, 2, dtype=torch.float64)
        coeffs[order, 0], coeffs[order, 1] = a, b
        coeffs = coeffs.view(-1).to(device=self._buf.device, dtype=torch.float32)
        return lin_comb(coeffs, self._view(), g, c)
