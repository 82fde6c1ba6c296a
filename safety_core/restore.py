"""Curvature-aware safety restoration (DESIGN.md, "Restoration").

Starting from the fine-tuned parameters theta_ft, raise the loss on harmful responses with an
influence step preconditioned by an L-BFGS inverse Hessian, inside a trust region that keeps
the task (retain) loss within eps of its starting value:

1. curvature pairs at theta_ft from probe steps on batches cycling over D_curv_forget,
   D_retain1 and D_retain2 (safety_core.lbfgs filters them and keeps the newest m);
2. d = H^-1 (grad L_forget - mu (theta - theta_ft));
3. p = eta d clipped to the radius delta; accepted iff L_retain(theta + p) <= L_retain(theta_ft)
   + eps; rho = actual / predicted change of L_retain steers delta; a rejected step is undone
   from a saved copy (bit-identical) and retried with a smaller radius;
4. steps 2-3 repeat for the configured iterations, optionally re-collecting the pairs.

Every vector of the algorithm is this rank's shard of the flattened trainable parameters (see
`ReplicatedSpace` and `Zero3Space`); every inner product is reduced over ranks, so all ranks
take the same decisions and N ranks compute what one rank would.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field

from safebasin.safety_core import data as data_lib
from safebasin.safety_core.args import Section
from safebasin.safety_core.data import IGNORE_INDEX, DataError, DataSource
from safebasin.safety_core.distributed import all_reduce_sum
from safebasin.safety_core.ds_config import DeepSpeedArgs, fill_auto, zero_stage
from safebasin.safety_core.lbfgs import CurvatureBuffer, shard_range
from safebasin.safety_core.modeling import MethodArgs, ModelArgs, export, load_model, load_tokenizer, make_trainable

PRECISION = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


class RestoreArgs(Section):
    forget: DataSource = Field(description="D_forget: harmful prompts with harmful responses; "
                               "the loss is the NLL of the response")
    curvature_forget: DataSource | None = Field(
        None, description="D_curv_forget for the curvature pairs; default (or the same source as "
        "forget): split from `forget`, disjoint from D_forget")
    retain: DataSource = Field(description="task data, split into disjoint D_retain1 and D_retain2")
    forget_size: int = Field(50, ge=1, description="|D_forget|")
    curvature_forget_size: int = Field(256, ge=1, description="|D_curv_forget|")
    retain1_size: int = Field(256, ge=1, description="|D_retain1|")
    retain2_size: int = Field(256, ge=1, description="|D_retain2|")
    history: int = Field(10, ge=1, description="m: newest curvature pairs kept")
    pair_threshold: float = Field(1e-6, description="a pair is kept iff the reduced <s, y> exceeds this")
    probes: int = Field(30, ge=1, description="probe batches per pair collection, cycling "
                        "D_curv_forget, D_retain1, D_retain2")
    eta_c: float = Field(1e-2, gt=0, description="probe step: s = -eta_c * batch gradient")
    iterations: int = Field(3, ge=1)
    eps: float = Field(0.1, description="retain tolerance: accept iff L_retain <= L_retain(theta_ft) + eps")
    mu: float = Field(0.0, ge=0, description="L2 pull back to theta_ft in the direction")
    eta: float = Field(1.0, gt=0, description="step scale: p = eta * d before clipping")
    delta: float = Field(1.0, gt=0, description="initial trust radius (L2 norm of the step)")
    max_retries: int = Field(5, ge=0, description="retries after a rejected step, per iteration")
    refresh_pairs: bool = Field(False, description="re-collect the pairs at the current parameters "
                                "before every iteration after the first")
    batch_size: int = Field(8, ge=1, description="examples per global batch (split over ranks)")
    max_length: int = Field(512, ge=8)
    system_prompt: str | None = None
    seed: int = 0


@dataclass
class RestoreResult:
    out_dir: Path
    final_dir: Path
    rows: list[dict]
    summary: dict
    model: object = None  # the restored module (ZeRO-3: still partitioned), for in-process callers


# ---------------------------------------------------------------------------------------------
# Data: four disjoint sets, split deterministically by seed


@dataclass
class RestoreSets:
    forget: list[dict]
    curvature_forget: list[dict]
    retain1: list[dict]
    retain2: list[dict]

    def sizes(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.__dict__.items()}


def _split(convs: list, sizes: list[int], names: list[str], source: DataSource, seed: int) -> list[list]:
    """Consecutive disjoint parts of one seeded shuffle of `convs`."""
    if sum(sizes) > len(convs):
        wanted = " + ".join(f"{n} {s}" for n, s in zip(names, sizes))
        raise DataError(f"restore: {source.path} has {len(convs)} records but {wanted} are asked for; "
                        f"lower the sizes (restore.*_size) or give a larger source")
    order = list(range(len(convs)))
    random.Random(seed).shuffle(order)
    parts, start = [], 0
    for size in sizes:
        parts.append([convs[i] for i in order[start:start + size]])
        start += size
    return parts


def build_sets(args: RestoreArgs, tokenizer) -> RestoreSets:
    forget_convs = data_lib.load_conversations(args.forget, args.system_prompt)
    if args.curvature_forget is None or args.curvature_forget == args.forget:
        forget, curv = _split(forget_convs, [args.forget_size, args.curvature_forget_size],
                              ["forget_size", "curvature_forget_size"], args.forget, args.seed)
    else:
        forget, = _split(forget_convs, [args.forget_size], ["forget_size"], args.forget, args.seed)
        curv, = _split(data_lib.load_conversations(args.curvature_forget, args.system_prompt),
                       [args.curvature_forget_size], ["curvature_forget_size"], args.curvature_forget,
                       args.seed)
    retain1, retain2 = _split(data_lib.load_conversations(args.retain, args.system_prompt),
                              [args.retain1_size, args.retain2_size], ["retain1_size", "retain2_size"],
                              args.retain, args.seed + 1)
    encoded = {name: data_lib.encode_all(tokenizer, convs, args.max_length)
               for name, convs in (("forget", forget), ("curvature_forget", curv),
                                   ("retain1", retain1), ("retain2", retain2))}
    empty = [name for name, ex in encoded.items() if not ex]
    if empty:
        raise DataError(f"restore: no example of {empty} keeps a response token within "
                        f"max_length={args.max_length}")
    return RestoreSets(**encoded)


def batches(examples: list[dict], size: int) -> list[list[dict]]:
    return [examples[i:i + size] for i in range(0, len(examples), size)]


def target_tokens(example: dict) -> int:
    """Tokens the shifted next-token loss is taken on (a label at position 0 is never predicted)."""
    return sum(1 for t in example["labels"][1:] if t != IGNORE_INDEX)


# ---------------------------------------------------------------------------------------------
# The trainable parameters as one flat vector, sharded over ranks


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
        self.valid = []
        for p in params:
            size = p.ds_tensor.ds_numel
            self.valid.append(max(0, min(size, p.ds_numel - self.rank * size)))
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
        from deepspeed.utils import safe_get_local_grad, safe_set_local_grad
        parts = []
        for p, n in zip(self.params, self.valid):
            g = safe_get_local_grad(p)
            parts.append(g[:n].float().to(self.device).clone())
            # Buffers of parameters a later backward leaves untouched would keep this gradient.
            safe_set_local_grad(p, torch.zeros_like(g))
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


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def loss_and_grad(space, examples_batches: list[list[dict]], pad_id: int, *,
                  grad: bool) -> tuple[float, torch.Tensor | None]:
    """Token-weighted mean NLL over all the batches (and its gradient shard when `grad`).

    Every rank takes examples rank, rank + world, ... of each global batch, so a batch's
    result does not depend on the world size. Under ZeRO-3 forwards are collective: a rank
    with no example in a batch runs the batch's first one with weight 0.
    """
    total = sum(target_tokens(e) for b in examples_batches for e in b)
    rank, world = space.rank, space.world
    local = 0.0
    for batch in examples_batches:
        mine = batch[rank::world]
        if not mine and not space.collective_forward:
            continue
        inputs = {k: v.to(space.device) for k, v in data_lib.collate(mine or batch[:1], pad_id).items()}
        with torch.set_grad_enabled(grad):
            nll = token_nll_sum(space.forward(inputs), inputs["labels"]) * (1.0 if mine else 0.0)
            if grad:
                space.backward(nll / total)
        local += nll.item()
    loss = all_reduce_sum([local])[0] / total
    return loss, space.reduced_grad() if grad else None


# ---------------------------------------------------------------------------------------------
# The algorithm


def collect_pairs(buffer: CurvatureBuffer, space, sets: RestoreSets, args: RestoreArgs, pad_id: int,
                  round_: int) -> int:
    """Probe pairs at the current parameters, cycling D_curv_forget, D_retain1, D_retain2; each
    round starts further along every set's batches. Returns the pairs the filter accepted."""
    cycle = [batches(s, args.batch_size) for s in (sets.curvature_forget, sets.retain1, sets.retain2)]
    per_set = math.ceil(args.probes / len(cycle))
    theta, saved = space.read(), space.snapshot()
    accepted = 0
    for i in range(args.probes):
        source = cycle[i % len(cycle)]
        batch = source[(round_ * per_set + i // len(cycle)) % len(source)]
        _, g0 = loss_and_grad(space, [batch], pad_id, grad=True)
        space.write(theta - args.eta_c * g0)
        # s is the displacement the parameters really took (after rounding to their dtype).
        s = space.read() - theta
        _, g1 = loss_and_grad(space, [batch], pad_id, grad=True)
        space.restore(saved)
        accepted += buffer.push(s, g1 - g0)
    return accepted


def update_radius(delta: float, step_norm: float, rho: float, accepted: bool, on_boundary: bool) -> float:
    if not accepted:
        # Shrink below the step just tried: a radius left above a short step would retry it.
        return min(delta, step_norm) / 4
    if rho < 0.25:
        return delta / 4
    if rho > 0.75 and on_boundary:
        return delta * 2
    return delta


def restore(model_args: ModelArgs, method: MethodArgs, args: RestoreArgs, ds_args: DeepSpeedArgs,
            out_dir: str | Path, *, log_fn: Callable[[dict, int], None] | None = None) -> RestoreResult:
    """Restore safety and export: an adapter folder when model.adapter is set, else full weights.
    `log_fn(row, iteration)` receives every iteration's metrics on rank 0."""
    from safebasin.safety_core.trainer import init_distributed
    out_dir = Path(out_dir)
    rank, world = init_distributed(ds_args.timeout_minutes)
    is_rank0 = rank == 0
    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(model_args)
    pad_id = tokenizer.pad_token_id
    sets = build_sets(args, tokenizer)
    space, stage, keep_alive = build_space(model_args, method, args, ds_args, world)

    metrics_path = out_dir / "metrics.jsonl"
    if is_rank0:
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics_path.unlink(missing_ok=True)
    forget_b = batches(sets.forget, args.batch_size)
    retain_b = batches(sets.retain1 + sets.retain2, args.batch_size)

    theta_ft = space.read().clone()
    forget_loss, g_forget = loss_and_grad(space, forget_b, pad_id, grad=True)
    retain_loss, g_retain = loss_and_grad(space, retain_b, pad_id, grad=True)
    retain_ft, forget_ft = retain_loss, forget_loss
    buffer = CurvatureBuffer(args.history, args.pair_threshold)
    collect_pairs(buffer, space, sets, args, pad_id, round_=0)

    delta, rows = args.delta, []
    for it in range(1, args.iterations + 1):
        t0 = time.perf_counter()
        if it > 1 and args.refresh_pairs:
            buffer.reset()
            collect_pairs(buffer, space, sets, args, pad_id, round_=it - 1)
        theta = space.read()
        d = buffer.apply_inverse(g_forget - args.mu * (theta - theta_ft))
        d_norm = math.sqrt(max(buffer.last_info.d_norm_sq, 0.0))
        saved = space.snapshot()
        accepted, tries = False, 0
        while not accepted and tries <= args.max_retries:
            tries += 1
            step_norm = min(args.eta * d_norm, delta)
            on_boundary = args.eta * d_norm >= delta
            p = d * (step_norm / d_norm if d_norm > 0 else 0.0)
            space.write(theta + p)
            new_retain, _ = loss_and_grad(space, retain_b, pad_id, grad=False)
            predicted, actual = space.dot(g_retain, p), new_retain - retain_loss
            rho = actual / predicted if predicted != 0 else float("nan")
            accepted = new_retain <= retain_ft + args.eps
            delta = update_radius(delta, step_norm, rho, accepted, on_boundary)
            if not accepted:
                space.restore(saved)
        if accepted:
            forget_loss, g_forget = loss_and_grad(space, forget_b, pad_id, grad=True)
            retain_loss, g_retain = loss_and_grad(space, retain_b, pad_id, grad=True)
        row = {"iteration": it, "forget_loss": forget_loss, "retain_loss": retain_loss, "rho": rho,
               "radius": delta, "accepted": accepted, "tries": tries, "pairs_kept": len(buffer),
               "step_norm": step_norm if accepted else 0.0, "predicted_change": predicted,
               "actual_change": actual, "seconds": time.perf_counter() - t0}
        rows.append(row)
        if is_rank0:
            with metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            if log_fn:
                log_fn(row, it)
            print(f"[safebasin restore] iteration {it}: forget {forget_loss:.4f}, retain {retain_loss:.4f} "
                  f"(start {retain_ft:.4f} + eps {args.eps}), {'accepted' if accepted else 'rejected'} "
                  f"after {tries} tries, rho {rho:.3f}, radius {delta:.4g}", flush=True)

    is_peft = model_args.adapter is not None
    final_dir = out_dir / ("adapter" if is_peft else "model")
    export(space.model, tokenizer, final_dir, zero3=stage == 3, is_rank0=is_rank0)
    summary = {"initial": {"forget_loss": forget_ft, "retain_loss": retain_ft},
               "restored": {"forget_loss": forget_loss, "retain_loss": retain_loss},
               "accepted_steps": sum(r["accepted"] for r in rows), "iterations": args.iterations,
               "sizes": sets.sizes(), "trainable_parameters": int(all_reduce_sum([space.numel])[0]),
               "zero_stage": stage, "world_size": world,
               "pairs": {"offered": buffer.stats.pushes, "accepted": buffer.stats.accepted,
                         "kept": len(buffer)}}
    del keep_alive
    return RestoreResult(out_dir=out_dir, final_dir=final_dir, rows=rows, summary=summary, model=space.model)


# ---------------------------------------------------------------------------------------------
# Model setup


def _device() -> torch.device:
    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    if acc.device_name() == "cpu":
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    acc.set_device(local)
    return torch.device(acc.device_name(local))


def _select_trainable(model, model_args: ModelArgs, method: MethodArgs) -> list[torch.nn.Parameter]:
    """The adapter's parameters when model.adapter is given, else all parameters (or the ones
    method.trainable names)."""
    if model_args.adapter is None:
        make_trainable(model, method.model_copy(update={"type": "full"}))
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"restore: model.adapter {model_args.adapter} has no trainable parameter")
    return params


def build_space(model_args: ModelArgs, method: MethodArgs, args: RestoreArgs, ds_args: DeepSpeedArgs,
                world: int):
    """(space, ZeRO stage, object to keep alive until export). Stages 0-2 replicate the
    parameters (their partitioning concerns optimizer state, which restoration has none of),
    so they share the replicated path; stage 3 goes through a DeepSpeed engine."""
    device = _device()
    config = _ds_config(ds_args, args, model_args, world)
    stage = zero_stage(config)
    if stage < 3:
        model = load_model(model_args, for_training=True)
        params = _select_trainable(model, model_args, method)
        model.to(device).eval()  # eval: no dropout, so a batch's gradient is a function of theta
        return ReplicatedSpace(model, params, device), stage, None
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig
    offload = config.get("zero_optimization", {}).get("offload_param", {}).get("device", "none")
    if offload == "nvme":
        raise ValueError("restore under ZeRO-3 writes parameter partitions in place; "
                         "offload_param to nvme is not supported (use cpu or none)")
    if model_args.dtype == "float16":
        raise ValueError("restore under ZeRO-3 reads DeepSpeed's gradient partitions, which fp16 "
                         "loss scaling would scale: use model.dtype bfloat16 or float32")
    hf_ds = HfDeepSpeedConfig(config)  # partitions the weights as they load
    model = load_model(model_args, for_training=True)
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
                     weight_decay=0.0, max_grad_norm=0.0, precision=PRECISION[model_args.dtype],
                     hidden_size=hidden, total_steps=1, warmup_steps=0,
                     on_cpu=get_accelerator().device_name() == "cpu")
