"""Where the curvature history lives and whether it fits, decided before it is allocated.

The history holds 2m vectors of this rank's shard of the trainable parameters (s and y per
pair): 2 m P_local bytes x 4 (fp32) or x 2 (bf16). For full-parameter restoration that is the
largest buffer of the job (m = 10 at 8B parameters on 8 ranks under ZeRO-3: 2 x 10 x 1e9 x 4 B =
80 GB per rank in fp32), so its size is printed, and a job whose history cannot fit in what the
device reports free is refused with the knobs that shrink it.
"""

from __future__ import annotations

import os

import torch
from safebasin.safety_core.distributed import all_reduce_sum

HISTORY_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class HistoryMemoryError(RuntimeError):
    pass


def history_bytes(history: int, numel: int, dtype: str) -> int:
    return 2 * history * numel * HISTORY_DTYPES[dtype].itemsize


def free_bytes(device: torch.device) -> int:
    """Free memory as the device reports it: the CUDA driver's free count for a GPU; for the CPU
    MemAvailable of /proc/meminfo shared by this node's ranks (LOCAL_WORLD_SIZE)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    return available // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def plan_history(history: int, numel: int, dtype: str, where: str, param_device: torch.device, *,
                 is_rank0: bool) -> torch.device:
    """The history's device (`where`: "parameters" or "cpu"), after printing its size per rank
    and checking on every rank that it fits; all ranks raise together when one cannot."""
    device = torch.device("cpu") if where == "cpu" else param_device
    need = history_bytes(history, numel, dtype)
    free = free_bytes(device)
    short = all_reduce_sum([1.0 if need > free else 0.0])[0]
    if is_rank0:
        print(f"[safebasin restore] curvature history: 2 x {history} pairs x {numel:,} parameters x "
              f"{HISTORY_DTYPES[dtype].itemsize} B ({dtype}) = {need / 2**30:.3g} GiB per rank on {device} "
              f"({free / 2**30:.3g} GiB free)", flush=True)
    if short:
        raise HistoryMemoryError(
            f"the curvature history needs {need / 2**30:.3g} GiB per rank on {device} but {int(short)} rank(s) "
            f"have less free (this one: {free / 2**30:.3g} GiB): lower restore.history (now {history}), set "
            f"restore.history_dtype bf16 (half the bytes; now {dtype}), restore.history_device cpu (now "
            f"{where}), or spread the parameters over more ranks with deepspeed.stage 3")
    return device
