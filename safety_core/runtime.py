"""Per-process compute settings every job applies before its first tensor op: the CPU thread
count, and a warning when the chosen precision is slow on this CPU."""

from __future__ import annotations

import os
import warnings

from pydantic import Field
from safebasin.safety_core.args import Section


class RuntimeArgs(Section):
    threads: int | None = Field(None, ge=1, description="torch threads per rank; default: "
                                "OMP_NUM_THREADS if set, else the usable cores divided by the "
                                "ranks on this node")


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """The launcher sets OMP_NUM_THREADS for multi-rank jobs; a one-rank job (in-process, or one
    rank per node) would otherwise let torch start a thread per core however many other
    processes share the machine: cores / local ranks is the fair share."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    return max(1, usable_cores() // max(1, local))


def apply_threads(args: RuntimeArgs | None) -> int:
    import torch
    threads = (args.threads if args is not None else None) or default_threads()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); without, torch emulates it
    through fp32 conversions and bf16 training runs many times slower than fp32."""
    try:
        flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "").split()
    except OSError:
        return True  # cannot tell (not Linux): no warning
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


_warned: set[str] = set()


def warn_slow_precision(precision: str, on_cpu: bool) -> bool:
    """Warn once per process when bf16 is chosen on a CPU without bf16 units. True if warned."""
    if precision != "bf16" or not on_cpu or cpu_has_bf16() or "bf16" in _warned:
        return False
    _warned.add("bf16")
    warnings.warn("train.precision=bf16 on a CPU without bf16 units (no avx512_bf16/amx_bf16 in "
                  "/proc/cpuinfo): torch emulates bf16 here, measured ~19x slower than fp32; use "
                  "train.precision=fp32 on this machine", RuntimeWarning, stacklevel=2)
    return True


def import_deepspeed():
    """`import deepspeed`, without the mlflow import it does on the way.

    DeepSpeed's autotuner imports mlflow at module level (for autotuning runs, which safebasin
    never starts): seconds on the critical path of every job before its first step. With mlflow
    hidden while deepspeed loads, the autotuner records that it has no mlflow, and the tracker
    imports mlflow on its own thread, overlapping model loading."""
    import sys
    if "deepspeed" in sys.modules:
        return sys.modules["deepspeed"]
    hide = "mlflow" not in sys.modules
    if hide:
        sys.modules["mlflow"] = None  # makes `import mlflow` raise ImportError
    try:
        import deepspeed
    finally:
        if hide and sys.modules.get("mlflow", 0) is None:
            del sys.modules["mlflow"]
    return deepspeed
