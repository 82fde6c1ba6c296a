"""DeepSpeed JSON configs: the bundled ds_configs/*.json or a user's file, "auto" fields filled
from the training arguments the way the Hugging Face integration does."""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator
from safebasin.safety_core.args import Section

BUNDLED = ("zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload")


class DeepSpeedArgs(Section):
    stage: int | None = Field(None, ge=0, le=3, description="ZeRO stage; picks ds_configs/zeroN.json")
    config: str | None = Field(None, description="a DeepSpeed JSON file, or a bundled name: "
                               + ", ".join(BUNDLED))
    offload: bool = Field(False, description="with `stage`: the CPU-offload variant (stage 2 or 3)")
    timeout_minutes: float = Field(30, gt=0, description="collective timeout in minutes (0.5 = 30 s): a dead or "
                                   "hung rank ends the job, the rank that notices naming it")

    @model_validator(mode="after")
    def _one_source(self):
        if self.stage is not None and self.config is not None:
            raise ValueError("give either deepspeed.stage or deepspeed.config, not both")
        if self.offload and self.stage not in (2, 3):
            raise ValueError("deepspeed.offload needs deepspeed.stage 2 or 3")
        return self

    def base_config(self) -> dict[str, Any]:
        if self.config is None:
            name = f"zero{self.stage or 0}" + ("_offload" if self.offload else "")
        else:
            name = self.config
        if name in BUNDLED:
            text = resources.files("safebasin.ds_configs").joinpath(f"{name}.json").read_text()
            return json.loads(text)
        path = Path(name)
        if not path.exists():
            raise FileNotFoundError(f"deepspeed.config: {name!r} is neither a file nor one of {BUNDLED}")
        return json.loads(path.read_text())


def fill_auto(config: dict[str, Any], *, micro_batch: int, grad_accum: int, world: int, lr: float,
              weight_decay: float, max_grad_norm: float, precision: str, hidden_size: int | None,
              total_steps: int, warmup_steps: int, on_cpu: bool) -> dict[str, Any]:
    """A copy of `config` with every "auto" value set; explicit values are kept as given."""
    cfg = copy.deepcopy(config)
    values = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world,
        "gradient_clipping": max_grad_norm,
    }
    for key, value in values.items():
        if cfg.get(key, "auto") == "auto":
            cfg[key] = value
    for key, on in (("bf16", precision == "bf16"), ("fp16", precision == "fp16")):
        section = cfg.setdefault(key, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = on
    opt = cfg.get("optimizer")
    if opt is not None:
        params = opt.setdefault("params", {})
        for key, value in (("lr", lr), ("weight_decay", weight_decay)):
            if params.get(key) == "auto":
                params[key] = value
        # FusedAdam needs a CUDA build; torch's AdamW is exact on the CPU accelerator.
        offloaded = "offload_optimizer" in cfg.get("zero_optimization", {})
        if on_cpu and not offloaded and opt.get("type", "").lower() in ("adam", "adamw"):
            params.setdefault("torch_adam", True)
    sched = cfg.get("scheduler")
    if sched is not None:
        params = sched.setdefault("params", {})
        for key, value in (("total_num_steps", total_steps), ("warmup_num_steps", warmup_steps),
                           ("warmup_max_lr", lr), ("warmup_min_lr", 0.0)):
            if params.get(key) == "auto":
                params[key] = value
    zero = cfg.get("zero_optimization", {})
    if hidden_size:
        for key, value in (("reduce_bucket_size", hidden_size * hidden_size),
                           ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
                           ("stage3_param_persistence_threshold", 10 * hidden_size)):
            if zero.get(key) == "auto":
                zero[key] = value
    left = [k for k, v in _walk(cfg) if v == "auto"]
    if left:
        raise ValueError(f"DeepSpeed config has 'auto' values safebasin cannot fill: {left}")
    return cfg


def _walk(d: Any, prefix: str = ""):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _walk(v, f"{prefix}.{k}" if prefix else k)
    else:
        yield prefix, d


def zero_stage(config: dict[str, Any]) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))
