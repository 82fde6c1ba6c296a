"""Which implementation runs an operation: the Triton kernel or the PyTorch reference.

SAFEBASIN_KERNEL_BACKEND (read at every call, so tests and jobs can switch it):
  auto    (default) CUDA tensors -> Triton; CPU tensors, float64 (the reference keeps fp64
          precision, the kernels accumulate in fp32) and shapes the kernels do not cover -> torch
  triton  always Triton; CPU tensors need TRITON_INTERPRET=1 set before triton is first
          imported, anything the kernels cannot take is refused with the reason
  torch   always the reference
"""

from __future__ import annotations

import importlib.util
import os

import torch

ENV = "SAFEBASIN_KERNEL_BACKEND"
CHOICES = ("auto", "triton", "torch")
# Element types the kernels load; arithmetic is fp32 whatever they are.
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Largest LoRA rank the kernels hold in registers (r x r Gram blocks).
MAX_RANK = 128


def rank_limit(r: int) -> str | None:
    """None when LoRA rank r fits the kernels, else the reason it does not."""
    return None if r <= MAX_RANK else f"LoRA rank {r} exceeds the Triton kernels' limit of {MAX_RANK}"


def requested() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{ENV}={os.environ[ENV]!r} is not a kernel backend; allowed values: "
                         f"{', '.join(CHOICES)}")
    return value


def use_triton(*tensors: torch.Tensor | None, unsupported: str | None = None) -> bool:
    """True when the Triton kernel should run on these tensors. `unsupported` is the caller's
    reason the kernels cannot take this call (a shape limit), or None."""
    choice = requested()
    if choice == "torch":
        return False
    present = [t for t in tensors if t is not None]
    on_cuda = all(t.is_cuda for t in present)
    bad_dtype = next((t.dtype for t in present if t.dtype not in TRITON_DTYPES), None)
    if choice == "auto":
        return (on_cuda and bad_dtype is None and unsupported is None
                and importlib.util.find_spec("triton") is not None)
    if bad_dtype is not None:
        raise TypeError(f"{ENV}=triton: the Triton kernels take float32, bfloat16 or float16 inputs "
                        f"(accumulating in fp32), got {bad_dtype}; use {ENV}=torch or auto for it")
    if unsupported is not None:
        raise ValueError(f"{ENV}=triton: {unsupported}; use {ENV}=torch or auto for it")
    if importlib.util.find_spec("triton") is None:
        raise RuntimeError(f"{ENV}=triton but triton is not installed (pip install triton)")
    if not on_cuda:
        if any(t.is_cuda for t in present):
            raise ValueError("tensors are on different devices: "
                             f"{sorted({str(t.device) for t in present})}")
        from safebasin.kernels import triton_common
        if not triton_common.INTERPRETED:
            raise RuntimeError(f"{ENV}=triton with CPU tensors needs the Triton interpreter: start the "
                               "process with TRITON_INTERPRET=1 (it is read when triton is first "
                               f"imported), or move the tensors to a GPU, or use {ENV}=torch or auto")
    return True
