"""Names of floating-point types, defined once: `model.dtype` values and the DeepSpeed
precision each one trains in; and a weight's fp32 value where training runs in half precision."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# model.dtype -> train.precision (DeepSpeed's "bf16"/"fp16" sections).
PRECISION = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; allowed: {sorted(DTYPES)}")
    return DTYPES[name]


def fp32_value(W: torch.nn.Parameter) -> torch.Tensor:
    """W's fp32 value, differentiable into W: the optimizer's fp32 master where training runs
    in half precision (ZeRO 1-2 hold it as hp fragments; assembling it is one all-reduce of the
    weight over the data-parallel group per call), else W itself. The straight-through form
    (value of the master, gradient into the module weight) keeps the penalty on autograd."""
    if W.dtype == torch.float32:
        return W
    from deepspeed.utils import safe_get_full_fp32_param
    master = safe_get_full_fp32_param(W)
    if master is None:
        # ZeRO-0 in bf16/fp16 keeps its masters in DeepSpeed's FP16_Optimizer, which has no
        # per-parameter view of them; reading the half-precision weight instead is the error
        # this function exists to avoid.
        raise RuntimeError(f"full-parameter anchoring in {W.dtype} reads DeltaW from DeepSpeed's fp32 master "
                           f"weights, which DeepSpeed exposes per parameter under ZeRO 1-3 only: use "
                           f"deepspeed.stage 1, 2 or 3, or train.precision fp32")
    low = W.float()
    return low + (master.to(low.device, torch.float32) - low).detach()
