"""GPU check of the device rule (issue 16, item 1): a rank binds cuda:LOCAL_RANK as its current
device before its first collective, so NCCL, DeepSpeed and the judges use its own GPU.

    python benchmarks/gpu_rank_binding.py            # exit 0: bound; non-zero: what was wrong

One rank on one GPU (a 2-rank run needs 2 GPUs): the rank goes through the same start as every
rank command (entry.run_rank_command's rank_device, then init_distributed's NCCL group), and
the check reads back the current device, the device a collective ran on and a judge's default.
With only one GPU visible, a second run with LOCAL_RANK=1 must fail with the clear message
instead of silently using GPU 0. Called by benchmarks/gpu_check.sh.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_one_rank() -> list[str]:
    import torch
    import torch.distributed as dist
    from safebasin.safety_core.distributed import init_distributed, rank_device
    from safebasin.safety_core.measure.judges import _device as judge_device
    local = int(os.environ["LOCAL_RANK"])
    device = rank_device()
    init_distributed(5)
    problems = []
    if dist.get_backend() != "nccl":
        problems.append(f"process group backend {dist.get_backend()!r}, expected 'nccl' on a GPU")
    if torch.cuda.current_device() != local:
        problems.append(f"current device {torch.cuda.current_device()} != LOCAL_RANK {local}")
    if device != torch.device("cuda", local):
        problems.append(f"rank_device() gave {device}, expected cuda:{local}")
    t = torch.ones(4, device="cuda")  # "cuda" without an index: the current device
    dist.all_reduce(t)
    if t.device.index != local:
        problems.append(f"a collective on 'cuda' ran on {t.device}, expected cuda:{local}")
    if judge_device(None) != torch.device("cuda", local):
        problems.append(f"a judge's default device is {judge_device(None)}, expected cuda:{local}")
    dist.destroy_process_group()
    return problems


def main() -> int:
    if os.environ.get("_GPU_RANK_BINDING_CHILD"):
        problems = check_one_rank()
        for p in problems:
            print(f"FAIL: {p}")
        return 1 if problems else 0
    import torch
    if not torch.cuda.is_available():
        print("FAIL: no CUDA device visible")
        return 1
    base = {**os.environ, "_GPU_RANK_BINDING_CHILD": "1", "RANK": "0", "WORLD_SIZE": "1",
            "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    base.pop("DS_ACCELERATOR", None)
    code = 0
    res = subprocess.run([sys.executable, __file__], env={**base, "LOCAL_RANK": "0", "MASTER_PORT": str(free_port())},
                         capture_output=True, text=True)
    print(f"1 rank, LOCAL_RANK=0: exit {res.returncode}")
    if res.returncode != 0:
        print(res.stdout[-2000:], res.stderr[-4000:])
        code = 1
    count = torch.cuda.device_count()
    res = subprocess.run([sys.executable, __file__], env={**base, "LOCAL_RANK": str(count), "MASTER_PORT": str(free_port())},
                         capture_output=True, text=True)
    refused = res.returncode != 0 and f"LOCAL_RANK={count} but only {count} GPU(s) are visible" in res.stderr
    print(f"1 rank, LOCAL_RANK={count} with {count} GPU(s): {'refused as expected' if refused else 'NOT refused'}")
    if not refused:
        print(res.stdout[-2000:], res.stderr[-4000:])
        code = 1
    print("gpu_rank_binding:", "ok" if code == 0 else "FAILED")
    return code


if __name__ == "__main__":
    sys.exit(main())
