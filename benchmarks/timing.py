"""Timing and allocation helpers shared by the benchmark scripts (run as `python benchmarks/X.py`,
so this folder is on sys.path)."""

from __future__ import annotations

import os
import time

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode


def with_backend(value: str, fn):
    """fn run with SAFEBASIN_KERNEL_BACKEND=value, the previous setting restored after."""
    def run():
        old = os.environ.get("SAFEBASIN_KERNEL_BACKEND")
        os.environ["SAFEBASIN_KERNEL_BACKEND"] = value
        try:
            return fn()
        finally:
            if old is None:
                del os.environ["SAFEBASIN_KERNEL_BACKEND"]
            else:
                os.environ["SAFEBASIN_KERNEL_BACKEND"] = old
    return run


def timed(fn, device: torch.device | str | None = None):
    """fn() -> elapsed seconds (waiting for the device's queued work when it is a GPU)."""
    sync = torch.cuda.synchronize if device is not None and torch.device(device).type == "cuda" else (lambda: None)

    def run() -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0
    return run


def interleaved(runs: dict, reps: int) -> dict[str, float]:
    """Best time of each contender, run round-robin after a warm-up round: on a shared machine
    interference only adds time, and interleaving exposes every contender to the same load."""
    for run in runs.values():
        run()
    best = {name: float("inf") for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            best[name] = min(best[name], run())
    return best


class AllocationTracker(TorchDispatchMode):
    """Tensor memory allocated by the ops run under it, backward included (autograd runs on the
    calling thread on CPU): `peak` live bytes of storages created inside (inputs that existed
    before are not counted) and the `largest` single one, in elements and bytes. Checked at every
    op, which is where allocations happen."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = self.largest_bytes = self.largest_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for ptr, (ref, nbytes) in list(self.live.items()):
            if ref.expired():
                del self.live[ptr]
                self.current -= nbytes
        # Views and in-place results share an input's storage: not an allocation.
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor) and a.device.type != "meta"}
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or ptr in self.live or ptr in inputs:
                continue
            self.live[ptr] = (StorageWeakRef(storage), nbytes)
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            if nbytes > self.largest_bytes:
                self.largest_bytes, self.largest_numel = nbytes, t.numel()
        return out
