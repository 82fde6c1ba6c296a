"""The trainable parameters as one flat vector sharded over ranks, the space every vector of
restoration lives in: replicated parameters (ZeRO 0-2) or DeepSpeed ZeRO-3 partitions, with
the forward / backward / reduced gradient / read / write / snapshot each needs, and how a
model is set up for either.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from safebasin.safety_core import zero3
from safebasin.safety_core.distributed import all_reduce_sum, rank_device
from safebasin.safety_core.nll import sharded_mean_nll
from safebasin.safety_core.precision import DTYPES
from safebasin.safety_core.restore.config import RestoreArgs
from safebasin.safety_core.restore.lbfgs import shard_range
from safebasin.safety_core.train import data as data_lib
from safebasin.safety_core.train.ds_config import DeepSpeedArgs, fill_auto, zero_stage
from safebasin.safety_core.train.modeling import (
    MethodArgs,
    ModelArgs,
    load_model,
    make_trainable,
)


class FlatSpace:
    """This rank's view of the flattened trainable parameters. Subclasses give: forward,
    backward, reduced_grad (the global mean gradient's shard, clearing the gradients), read /
    write of the parameter shard, and snapshot / restore of exactly what the rank holds."""

    collective_forward: bool  # every rank must run every forward (ZeRO-3 gathers in them)
    rank: int
    world: int
    numel: int  # length of this rank's shard
    device: torch.device

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """<a, b> over the whole vector, from two shards."""
        return all_reduce_sum([float(a.double() @ b.double())])[0]


class ReplicatedSpace(FlatSpace):
    """Parameters replicated on every rank (ZeRO 0-2, plain data parallel; one rank alike).

    The flat vector is the concatenation of the trainable parameters in module order; this rank
    holds the contiguous slice `shard_range(P, rank, world)` of every vector of the algorithm.
    Gradients are summed over ranks with one all-reduce of the full vector (each rank's loss is
    already divided by the global token count), and a new parameter vector is all-gathered from
    the shards before it is written.

    Cost at scale: every gradient (one per loss_and_grad call: two per iteration, two per probe)
    all-reduces the full fp32 gradient, 4 P bytes, and each rank holds it whole besides the fp32
    weights; only the L-BFGS vectors are sharded. That suits adapters and small models; full-
    parameter restoration of large models goes through ZeRO-3 (Zero3Space), which reduce-scatters
    and keeps 1 / world of everything.
    """

    collective_forward = False

    def __init__(self, model, params: list[torch.nn.Parameter], device: torch.device):
        self.model, self.params, self.device = model, params, device
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.total = sum(p.numel() for p in params)
        self.start, self.end = shard_range(self.total, self.rank, self.world)
        self.numel = self.end - self.start

    def forward(self, batch: dict) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def _pieces(self, tensors):
        """(tensor's flat view, slice within it) for the parts of this rank's shard, in order."""
        offset = 0
        for t in tensors:
            lo, hi = max(self.start - offset, 0), min(self.end - offset, t.numel())
            if lo < hi:
                yield t.reshape(-1), slice(lo, hi)
            offset += t.numel()

    def read(self) -> torch.Tensor:
        return torch.cat([flat[sl].detach().float() for flat, sl in self._pieces(self.params)]
                         or [torch.zeros(0, device=self.device)])

    def reduced_grad(self) -> torch.Tensor:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        full = torch.cat([g.reshape(-1).float() for g in grads])
        if self.world > 1:
            dist.all_reduce(full)
        self.model.zero_grad(set_to_none=True)
        return full[self.start:self.end].clone()

    @torch.no_grad()
    def write(self, shard: torch.Tensor) -> None:
        full = self._gather(shard)
        offset = 0
        for p in self.params:
            p.copy_(full[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    def _gather(self, shard: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return shard
        # all_gather wants equal sizes: shards differ by at most one element.
        width = math.ceil(self.total / self.world)
        padded = torch.zeros(width, dtype=shard.dtype, device=shard.device)
        padded[:shard.numel()] = shard
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        sizes = [end - start for start, end in (shard_range(self.total, r, self.world) for r in range(self.world))]
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def restore(self, saved: list[torch.Tensor]) -> None:
        for p, s in zip(self.params, saved):
            p.copy_(s)


class Zero3Space(FlatSpace):
    """Parameters partitioned by DeepSpeed ZeRO-3: the flat vector is the concatenation of each
    trainable parameter's local partition (padding cut off), so the L-BFGS shards line up with
    the ZeRO partition and no parameter is ever gathered for the algorithm.

    Forward and backward go through the engine (collective on every rank); DeepSpeed
    reduce-scatters gradients into the optimizer's partitions, which are read with
    safe_get_local_grad. The optimizer exists only so DeepSpeed keeps those partitions: it is
    never stepped; updates are written to the module's partitions (ds_tensor) directly.
    """

    collective_forward = True

    def __init__(self, engine, params: list[torch.nn.Parameter], device: torch.device):
        self.engine, self.model, self.params, self.device = engine, engine.module, params, device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.valid = [zero3.partition(p).valid for p in params]
        self.numel = sum(self.valid)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed averages gradients over ranks; the loss is already a share of a global sum.
        self.engine.backward(loss * self.world)

    def read(self) -> torch.Tensor:
        return torch.cat([p.ds_tensor.detach()[:n].float().to(self.device)
                          for p, n in zip(self.params, self.valid)])

    @torch.no_grad()
    def reduced_grad(self) -> torch.Tensor:
        parts = []
        for p, n in zip(self.params, self.valid):
            parts.append(zero3.local_grad(p)[:n].float().to(self.device).clone())
            # Buffers of parameters a later backward leaves untouched would keep this gradient.
            zero3.zero_local_grad(p)
        self.engine.optimizer.zero_grad()
        return torch.cat(parts)

    @torch.no_grad()
    def write(self, shard: torch.Tensor) -> None:
        self._release()
        offset = 0
        for p, n in zip(self.params, self.valid):
            p.ds_tensor[:n].copy_(shard[offset:offset + n].view(-1))
            offset += n
        self._regather()

    def snapshot(self) -> list[torch.Tensor]:
        return [p.ds_tensor.detach().clone() for p in self.params]

    @torch.no_grad()
    def restore(self, saved: list[torch.Tensor]) -> None:
        self._release()
        for p, s in zip(self.params, saved):
            p.ds_tensor.copy_(s)
        self._regather()

    # Around a write, as around DeepSpeed's own optimizer step: every gathered copy is released
    # first (a parameter still gathered, such as a small "persistent" one, would not be gathered
    # again and would keep its old value), and the persistent ones are gathered after.
    def _release(self) -> None:
        self.engine.optimizer.parameter_offload.partition_all_parameters()

    def _regather(self) -> None:
        persistent = self.engine.optimizer.persistent_parameters
        if persistent:
            persistent[0].all_gather(persistent)


def loss_and_grad(space: FlatSpace, examples_batches: list[list[dict]], pad_id: int, *,
                  grad: bool) -> tuple[float, torch.Tensor | None]:
    """Token-weighted mean NLL over all the batches (and its gradient shard when `grad`),
    independent of the world size (see nll.sharded_mean_nll)."""
    def to_inputs(examples: list[dict]) -> dict:
        return {k: v.to(space.device) for k, v in data_lib.collate(examples, pad_id).items()}
    loss = sharded_mean_nll(space.forward, examples_batches, to_inputs, rank=space.rank, world=space.world,
                            collective=space.collective_forward, backward=space.backward if grad else None)
    return loss, space.reduced_grad() if grad else None


def _select_trainable(model, model_args: ModelArgs, method: MethodArgs) -> list[torch.nn.Parameter]:
    """The adapter's parameters when model.adapter is given, else all parameters (or the ones
    method.trainable names)."""
    if model_args.adapter is None:
        make_trainable(model, method.model_copy(update={"type": "full"}))
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"restore: model.adapter {model_args.adapter} has no trainable parameter")
    return params


def _fp32_at_model_dtype(model, dtype: str, *, partitioned: bool) -> None:
    """Round every parameter (held in fp32) through model.dtype: restoration starts at the
    weights the model has in its dtype, and computes from there in fp32."""
    low = DTYPES[dtype]
    if low == torch.float32:
        return
    with torch.no_grad():
        for p in model.parameters():
            t = p.ds_tensor if partitioned else p.data
            t.copy_(t.to(low).float())


def build_space(model_args: ModelArgs, method: MethodArgs, args: RestoreArgs, ds_args: DeepSpeedArgs,
                world: int):
    """(space, ZeRO stage, object to keep alive until export). Stages 0-2 replicate the
    parameters (their partitioning concerns optimizer state, which restoration has none of),
    so they share the replicated path; stage 3 goes through a DeepSpeed engine.

    Whatever model.dtype is, restoration computes in fp32 from the model.dtype-rounded weights:
    the curvature pairs y = g1 - g0 are differences of nearby gradients, which bf16 rounding
    (8 bits) would dominate, and probe steps s = -eta_c g below a weight's last bf16 bit would
    vanish. The cost is an fp32 copy of the weights: 4 bytes per parameter replicated on
    every rank under ZeRO 0-2, 4 / world under ZeRO-3 (the path for large models). The result
    is exported in fp32 (loop.py says why)."""
    device = rank_device()
    config = _ds_config(ds_args, args, model_args, world)
    stage = zero_stage(config)
    fp32_args = model_args.model_copy(update={"dtype": "float32"})
    if stage < 3:
        model = load_model(fp32_args, for_training=True)
        _fp32_at_model_dtype(model, model_args.dtype, partitioned=False)
        params = _select_trainable(model, model_args, method)
        model.to(device).eval()  # eval: no dropout, so a batch's gradient is a function of theta
        return ReplicatedSpace(model, params, device), stage, None
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig
    offload = config.get("zero_optimization", {}).get("offload_param", {}).get("device", "none")
    if offload == "nvme":
        raise ValueError("restore under ZeRO-3 writes parameter partitions in place; "
                         "offload_param to nvme is not supported (use cpu or none)")
    hf_ds = HfDeepSpeedConfig(config)  # partitions the weights as they load
    model = load_model(fp32_args, for_training=True)
    _fp32_at_model_dtype(model, model_args.dtype, partitioned=True)
    params = _select_trainable(model, model_args, method)
    # Never stepped (lr 0): DeepSpeed builds its gradient partitions around an optimizer.
    optimizer = torch.optim.AdamW(params, lr=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    engine.eval()
    return Zero3Space(engine, params, engine.device), stage, hf_ds


def _ds_config(ds_args: DeepSpeedArgs, args: RestoreArgs, model_args: ModelArgs, world: int) -> dict:
    from deepspeed.accelerator import get_accelerator
    from transformers import AutoConfig
    config = ds_args.base_config()
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)  # restoration takes no optimizer steps
    # One backward is one reduction; batches are accumulated by the code above, not DeepSpeed.
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        config[key] = "auto"
    config["zero_force_ds_cpu_optimizer"] = False
    hidden = getattr(AutoConfig.from_pretrained(model_args.resolved_path(),
                                                trust_remote_code=model_args.trust_remote_code),
                     "hidden_size", None)
    return fill_auto(config, micro_batch=args.batch_size, grad_accum=1, world=world, lr=0.0,
                     weight_decay=0.0, max_grad_norm=0.0, precision="fp32",
                     hidden_size=hidden, total_steps=1, warmup_steps=0,
                     on_cpu=get_accelerator().device_name() == "cpu")
