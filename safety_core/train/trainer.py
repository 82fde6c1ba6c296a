"""The training loop: one readable pass over deepspeed.initialize for LoRA or full-parameter
fine-tuning under ZeRO 0-3, with deterministic, resumable data order and checkpoints.

Extension point: `Regularizer` objects (the safety anchor is one). `loss(model)` is added to
every micro-batch loss (autograd path, replicated parameters); `before_step(engine)` runs once
per optimizer step after the last backward and before the optimizer step and clipping, where
a regularizer may add to the (possibly ZeRO-3 partitioned) gradients directly.

(Over 300 lines: the loop is kept in one function so it reads top to bottom; what sits beside
it here, checkpoint saving and the resume checks, shares the loop's step and world-size state.)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Protocol

import torch
import torch.distributed as dist
from pydantic import Field, model_validator
from safebasin.safety_core.args import Section
from safebasin.safety_core.distributed import (
    all_gather_object,
    all_reduce_sum,
    chunks,
    init_distributed,
    report_progress,
)
from safebasin.safety_core.nll import sharded_mean_nll
from safebasin.safety_core.progress import Progress
from safebasin.safety_core.runtime import warn_slow_precision
from safebasin.safety_core.train import checkpoints
from safebasin.safety_core.train import data as data_lib
from safebasin.safety_core.train import integrity
from safebasin.safety_core.train import packing as packing_lib
from safebasin.safety_core.train.data import DataArgs, StepSampler
from safebasin.safety_core.train.ds_config import DeepSpeedArgs, fill_auto, zero_stage
from safebasin.safety_core.train.faults import Faults
from safebasin.safety_core.train.mixture import training_set_with_report
from safebasin.safety_core.train.modeling import (
    MethodArgs,
    ModelArgs,
    enable_gradient_checkpointing,
    export,
    load_model,
    load_tokenizer,
    make_trainable,
)
from safebasin.safety_core.train.probe_config import SafetyProbeArgs
from safebasin.safety_core.train.summary import report_data


class TrainArgs(Section):
    seed: int = 0
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "linear", "constant", "step"] = Field(
        "cosine", description="after warmup: cosine / linear decay to 0, constant, or step (the LR times "
        "step_gamma after every epoch, torch's StepLR as the AsFT reference uses it)")
    step_gamma: float = Field(0.85, gt=0, le=1, description="schedule step: the factor per epoch")
    max_steps: int | None = Field(None, ge=1)
    epochs: float | None = Field(None, gt=0)
    micro_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    max_grad_norm: float = Field(1.0, ge=0)
    eval_every: int = Field(0, ge=0, description="optimizer steps between held-out evals; 0: at the end only")
    save_every: int = Field(500, ge=0, description="optimizer steps between checkpoints, plus one at the "
                            "end (what --resume continues from); 0: none")
    keep_checkpoints: int = Field(2, ge=1)
    eval_batch_size: int = Field(8, ge=1)
    log_every: int = Field(0, ge=0, description="steps between plain progress lines when output is not "
                           "a terminal; 0: every tenth of the job")
    safety_probe: SafetyProbeArgs | None = Field(None, description="HRR on held-out harmful prompts "
                                                 "every N steps (measure/probe.py)")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward: "
                                         "less memory, ~1/3 more compute")
    stop_on_nonfinite: bool = Field(True, description="end the job when the loss or gradient norm turns "
                                    "NaN/inf (the step is logged; no checkpoint is written from it)")

    @model_validator(mode="after")
    def _length(self):
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of train.max_steps and train.epochs")
        return self


class Regularizer(Protocol):
    def loss(self, model) -> torch.Tensor | None: ...
    def before_step(self, engine) -> dict[str, float]: ...


class StepHook(Protocol):
    """Runs after every optimizer step on every rank (the safety probe is one): `metrics` joins
    the step's row; a `stop` message saves a checkpoint and ends the job with TrainingStopped."""
    def metrics(self, engine, step: int) -> dict[str, float]: ...
    def stop(self, row: dict, checkpoint_dir: Path) -> str | None: ...


class TrainingStopped(RuntimeError):
    """A step hook stopped the job; the checkpoint of the last step was saved first."""


class NonFiniteLoss(RuntimeError):
    """The loss or gradient norm turned NaN/inf: the job ends with its last good checkpoint as
    `latest` (the weights after this step are not saved)."""


@dataclass
class TrainResult:
    out_dir: Path
    final_dir: Path
    steps: int
    metrics: dict = field(default_factory=dict)
    model: object = None  # the trained module (ZeRO-3: still partitioned), for in-process callers


def lr_lambda(schedule: str, warmup: int, total: int, *, gamma: float = 1.0,
              steps_per_epoch: int = 1) -> Callable[[int], float]:
    """The LR factor of optimizer step `step` (0-based). After warmup these are transformers'
    cosine, linear and constant schedules (same formulas); `step` multiplies by gamma once per
    finished epoch (counted from the first step, as StepLR stepped per epoch does). Not `transformers.get_scheduler`
    itself: its warmup gives the first step lr 0 (a wasted optimizer step), where this warmup
    ramps (step + 1) / (warmup + 1); switching would also change every recorded trajectory
    (resume tests, the demo's measured numbers)."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        if schedule == "step":
            return gamma ** (step // max(1, steps_per_epoch))
        return 1.0
    return factor


def latest_checkpoint(out_dir: Path) -> Path | None:
    ckpt = out_dir / "checkpoints"
    return ckpt if (ckpt / "latest").exists() else None


def _mean_across_ranks(values: list[float]) -> list[float]:
    world = dist.get_world_size()
    if world == 1:
        return list(values)
    # all_reduce_sum reduces on the backend's device: NCCL takes no CPU tensor (seen on an H200).
    return [v / world for v in all_reduce_sum(values)]


def train(model_args: ModelArgs, method: MethodArgs, data_args: DataArgs, train_args: TrainArgs,
          ds_args: DeepSpeedArgs, out_dir: str | Path, *, regularizers: list[Regularizer] = (),
          regularizer_factory: Callable | None = None, log_fn: Callable[[dict, int], None] | None = None,
          resume: bool = False, client_state: dict | Callable[[], dict] | None = None,
          data_summary_fn: Callable[[dict], None] | None = None,
          step_hooks: list[StepHook] | Callable[[object], list[StepHook]] = ()) -> TrainResult:
    """Fine-tune and export. `regularizer_factory(model, engine_config)` builds regularizers once
    the trainable model exists. `log_fn(metrics, step)` receives every step's metrics on rank 0,
    `data_summary_fn(summary)` the data summary (train/summary.py) before the first step;
    `client_state` (or a function returning it, called at each checkpoint save, so that an
    MLflow run opened in the background is not waited for before) is stored in checkpoints. `step_hooks`: StepHooks,
    or a function of the tokenizer that makes them."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from transformers.integrations import HfDeepSpeedConfig

    out_dir = Path(out_dir)
    rank, world = init_distributed(ds_args.timeout_minutes)
    is_rank0 = rank == 0
    torch.manual_seed(train_args.seed)

    on_cpu = get_accelerator().device_name() == "cpu"
    warn_slow_precision(train_args.precision, on_cpu)
    ckpt = latest_checkpoint(out_dir)
    if resume and ckpt is not None:
        accum, note = checkpoints.resume_accumulation(ckpt, train_args.micro_batch_size,
                                                      train_args.gradient_accumulation_steps, world)
        if note:
            train_args = train_args.model_copy(update={"gradient_accumulation_steps": accum})
            if is_rank0:
                print(f"[safebasin] resume at {world} ranks: {note}", flush=True)
    tokenizer = load_tokenizer(model_args)
    step_hooks = list(step_hooks(tokenizer) if callable(step_hooks) else step_hooks)
    conversations, mix_report = training_set_with_report(data_args)
    train_set = _encode(tokenizer, conversations, data_args)
    dropped = _check_dropped("data.train", len(conversations), len(train_set), data_args)
    if is_rank0:
        summary = report_data(tokenizer, conversations, mix_report, data_args.max_length, out_dir)
        if data_summary_fn is not None:
            data_summary_fn(summary)
    eval_set = []
    if data_args.eval:
        eval_convs = data_lib.load_conversations(data_args.eval, data_args.system_prompt)
        eval_set = _encode(tokenizer, eval_convs, data_args)
        _check_dropped("data.eval", len(eval_convs), len(eval_set), data_args)
    sampler = StepSampler(len(train_set), train_args.micro_batch_size,
                          train_args.gradient_accumulation_steps, world, train_args.seed)
    total_steps = train_args.max_steps or math.ceil(train_args.epochs * len(train_set) / sampler.global_batch)

    from transformers import AutoConfig
    hidden = getattr(AutoConfig.from_pretrained(model_args.resolved_path(),
                                                trust_remote_code=model_args.trust_remote_code),
                     "hidden_size", None)
    ds_config = fill_auto(ds_args.base_config(), micro_batch=train_args.micro_batch_size,
                          grad_accum=train_args.gradient_accumulation_steps, world=world,
                          lr=train_args.lr, weight_decay=train_args.weight_decay,
                          max_grad_norm=train_args.max_grad_norm, precision=train_args.precision,
                          hidden_size=hidden, total_steps=total_steps,
                          warmup_steps=train_args.warmup_steps, on_cpu=on_cpu)
    stage = zero_stage(ds_config)
    if resume and ckpt is not None and checkpoints.universal_needed(ckpt, world):
        # Saved at another world size: load the universal form the launcher converted.
        if not checkpoints.universal_ready(ckpt):
            raise checkpoints.CheckpointError(
                f"{ckpt} was saved by {checkpoints.saved_world_size(ckpt)} ranks, this job has {world}: "
                f"resume through the safebasin CLI, which converts it to a universal checkpoint first")
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    # Keeping this object alive makes from_pretrained partition weights as they load (ZeRO-3).
    hf_ds = HfDeepSpeedConfig(ds_config) if stage == 3 else None
    model = make_trainable(load_model(model_args, for_training=True), method)
    if train_args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    scheduler = None if "scheduler" in ds_config else (
        lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lr_lambda(train_args.schedule, train_args.warmup_steps, total_steps, gamma=train_args.step_gamma,
                           steps_per_epoch=math.ceil(len(train_set) / sampler.global_batch))))
    # DeepSpeed's fp32 path without ZeRO clips with a norm it never keeps (get_global_grad_norm
    # stays None), so logging the norm took a second pass over the gradients: there the loop
    # clips itself, with torch's clip_grad_norm_ (the same rule), and logs the norm it returns.
    own_clip = stage == 0 and train_args.precision == "fp32"
    clip_norm = float(ds_config.get("gradient_clipping") or 0.0)
    engine, _, _, lr_sched = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
        config={**ds_config, "gradient_clipping": 0.0} if own_clip else ds_config, lr_scheduler=scheduler)
    if regularizer_factory is not None:
        regularizers = list(regularizers) + list(regularizer_factory(engine.module, ds_config))
    if world == 1 and stage == 0:
        # One rank: DeepSpeed's gradient all-reduce is an identity that still costs a collective
        # round trip per step (3 ms of a 25 ms tiny-model step, measured).
        engine.enable_backward_allreduce = False

    start_step = 0
    # What each checkpoint records besides the weights: the caller's state is read at save time
    # (it holds the MLflow run id, which may still be opening while the first steps run).
    resumed_state: dict = {}

    def checkpoint_state() -> dict:
        return {**resumed_state, **dict((client_state() if callable(client_state) else client_state) or {})}

    if resume and ckpt is not None:
        _, loaded = engine.load_checkpoint(str(ckpt))
        ours = loaded["safebasin"]
        start_step = int(ours["step"])
        consumed = ours.get("consumed_samples")
        if consumed is not None and consumed != start_step * sampler.global_batch:
            raise checkpoints.CheckpointError(
                f"{ckpt}: {consumed} samples consumed in {start_step} steps is not {start_step} x the "
                f"global batch {sampler.global_batch}; the data order would skip or repeat examples")
        resumed_state = dict(ours)
    elif resume and is_rank0:
        print(f"[safebasin] --resume: no checkpoint under {out_dir / 'checkpoints'}; starting fresh")
    if resume:
        _check_same_start(start_step, engine.device)
    metrics_path = out_dir / "metrics.jsonl"
    if is_rank0:
        out_dir.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(metrics_path, start_step)
        (out_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
    device = engine.device
    pad_id = tokenizer.pad_token_id

    def batch_to(examples):
        return {k: v.to(device) for k, v in data_lib.collate(examples, pad_id).items()}

    trainable = [p for p in engine.module.parameters() if p.requires_grad]

    faults = Faults.from_env()  # the fault tests' injections; none in a normal job
    progress = Progress(total_steps, "train", initial=start_step, disable=not is_rank0, unit="step",
                        every=train_args.log_every or max(1, total_steps // 10))
    last = {}
    # Step time is wall-clock from the end of one step to the end of the next, so it includes
    # everything the loop does per step (logging, progress, checkpoints), not only compute.
    step_end = time.perf_counter()
    for step in range(start_step, total_steps):
        report_progress(step + 1)  # a collective timeout names the ranks behind this step
        engine.train()
        # Dropout and other randomness depend on (seed, step, rank) only: resumes replay exactly.
        torch.manual_seed(train_args.seed * 1_000_003 + step * 4099 + rank)
        micro = sampler.micro_batches(step, rank)
        losses, tokens, positions, reg_metrics, grad_norm = [], 0, 0, {}, None
        for i, idx in enumerate(micro):
            mb = packing_lib.micro_batch([train_set[j] for j in idx], pad_id, data_args.packing,
                                         data_args.max_length)
            # No KV cache in training: with one, transformers skips the packed-sequence mask.
            loss = engine(**{k: v.to(device) for k, v in mb.inputs.items()}, use_cache=False).loss
            if faults.nan_at_step == step + 1:
                loss = loss * float("nan")
            losses.append(loss.item())
            tokens += mb.real_tokens
            positions += mb.positions
            for reg in regularizers:
                extra = reg.loss(engine.module)
                if extra is not None:
                    loss = loss + extra
            engine.backward(loss)
            if i == len(micro) - 1:
                for reg in regularizers:
                    reg_metrics.update(reg.before_step(engine))
                if own_clip:
                    grad_norm = _clip(trainable, clip_norm)
            engine.step()
        mean_loss, tokens_mean, positions_mean = _mean_across_ranks([sum(losses) / len(losses), tokens, positions])
        tokens_all = int(round(tokens_mean * world))
        if grad_norm is None:
            grad_norm = engine.get_global_grad_norm()
        now = time.perf_counter()
        elapsed, step_end = now - step_end, now
        row = {"step": step + 1, "loss": mean_loss, "lr": lr_sched.get_last_lr()[0] if lr_sched else train_args.lr,
               "grad_norm": float(grad_norm) if grad_norm is not None else None,
               "tokens": tokens_all, "tokens_per_s": tokens_all / elapsed, "step_seconds": elapsed,
               "padding_share": 1.0 - tokens_mean / positions_mean,
               **reg_metrics}
        if train_args.eval_every and eval_set and (step + 1) % train_args.eval_every == 0:
            row["eval_loss"] = evaluate_loss(engine, eval_set, batch_to, train_args.eval_batch_size)
        for hook in step_hooks:
            row.update(hook.metrics(engine, step + 1))
        if is_rank0:
            with metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            if log_fn:
                log_fn(row, step + 1)
            progress.set_postfix(loss=f"{mean_loss:.4f}")
        progress.update(1)
        last = row
        bad = [k for k in ("loss", "grad_norm") if row[k] is not None and not math.isfinite(row[k])]
        if bad and train_args.stop_on_nonfinite:
            progress.close()
            kept = checkpoints.latest_tag(out_dir / "checkpoints")
            raise NonFiniteLoss(f"step {step + 1}: {' and '.join(f'{k} {row[k]}' for k in bad)}; the job stops "
                                f"(train.stop_on_nonfinite) and writes no checkpoint from this step; "
                                + (f"the last good checkpoint is {kept} (--resume continues from it)"
                                   if kept else "no checkpoint was saved before it"))
        if train_args.save_every and (step + 1) % train_args.save_every == 0 and step + 1 < total_steps:
            save_checkpoint(engine, out_dir, step + 1, checkpoint_state(), train_args.keep_checkpoints, faults)
        stops = [msg for hook in step_hooks if (msg := hook.stop(row, out_dir / "checkpoints"))]
        if stops:
            save_checkpoint(engine, out_dir, step + 1, checkpoint_state(), train_args.keep_checkpoints, faults)
            progress.close()
            raise TrainingStopped("; ".join(stops))
        faults.after_step(step + 1, rank)
    progress.close()

    final = {**last, "examples_dropped": dropped}
    if eval_set:
        final["eval_loss"] = evaluate_loss(engine, eval_set, batch_to, train_args.eval_batch_size)
        if is_rank0 and log_fn:
            log_fn({"eval_loss": final["eval_loss"]}, total_steps)
    final_dir = out_dir / ("adapter" if method.type == "lora" else "model")
    export(engine.module, tokenizer, final_dir, zero3=stage == 3, is_rank0=is_rank0)
    if train_args.save_every:
        save_checkpoint(engine, out_dir, total_steps, checkpoint_state(), train_args.keep_checkpoints, faults)
    del hf_ds
    return TrainResult(out_dir=out_dir, final_dir=final_dir, steps=total_steps, metrics=final,
                       model=engine.module)


def _check_dropped(what: str, drawn: int, kept: int, data_args: DataArgs) -> int:
    """Examples whose response max_length truncated away entirely are dropped; more than
    data.max_dropped_share of a set is refused with the numbers, never trained on silently."""
    dropped = drawn - kept
    if dropped > data_args.max_dropped_share * drawn:
        raise data_lib.DataError(f"{what}: {dropped} of {drawn} examples lose their whole response at "
                                 f"data.max_length={data_args.max_length} (data.max_dropped_share="
                                 f"{data_args.max_dropped_share}); raise data.max_length or the share")
    return dropped


def _encode(tokenizer, convs, data_args: DataArgs) -> list[dict[str, list[int]]]:
    if not data_args.cache:
        return data_lib.encode_all(tokenizer, convs, data_args.max_length)
    from safebasin.safety_core.train.tokenize_cache import encode_cached
    return encode_cached(tokenizer, convs, data_args.max_length, cache_dir=data_args.cache_dir,
                         num_proc=data_args.num_proc)[0]


@torch.no_grad()
def _clip(params: list[torch.Tensor], max_norm: float) -> float:
    """Clip the gradients to max_norm (0: no clipping) and return their norm before clipping."""
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return 0.0
    return float(torch.nn.utils.clip_grad_norm_(with_grad, max_norm if max_norm > 0 else float("inf")))


@torch.no_grad()
def evaluate_loss(engine, examples, batch_to, batch_size: int) -> float:
    """Token-weighted held-out loss over all ranks (ZeRO-3: every rank runs every forward)."""
    engine.eval()
    world = dist.get_world_size()
    loss = sharded_mean_nll(lambda b: engine(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                            chunks(examples, batch_size * world), batch_to, rank=dist.get_rank(), world=world,
                            collective=True)
    engine.train()
    return loss


def save_checkpoint(engine, out_dir: Path, step: int, client_state: dict, keep: int,
                    faults: Faults = Faults()) -> None:
    ckpt = out_dir / "checkpoints"
    rank = dist.get_rank()
    # DeepSpeed's own `latest` is written by rank 0 once rank 0's files are done, while other
    # ranks may still be writing their shards: a crash then would leave it naming an incomplete
    # checkpoint. So `latest` is written here, after the barrier that ends save_checkpoint (every
    # shard is written by then) and after the manifest of every file's size and hash, and
    # atomically: a rank killed or a disk full mid-save keeps the previous checkpoint `latest`.
    tag = f"step{step}"
    # The world size tells a resume whether the ZeRO shards must go through the universal format;
    # the samples consumed and the global batch let a resume on another world size keep the
    # data order and the schedule (checkpoints.resume_accumulation).
    batch = engine.train_batch_size()
    faults.arm_save(engine, step, rank)
    try:
        engine.save_checkpoint(str(ckpt), tag=tag, save_latest=False, client_state={
            "safebasin": {**client_state, "step": step, "world_size": dist.get_world_size(),
                          "global_batch": batch, "consumed_samples": step * batch}})
        digests = all_gather_object(integrity.rank_digests(ckpt / tag, rank))
        if rank == 0:
            integrity.write_manifest(ckpt / tag, {name: d for part in digests for name, d in part.items()})
            tmp = ckpt / f".latest.{os.getpid()}.tmp"
            try:
                tmp.write_text(tag)
                os.replace(tmp, ckpt / "latest")
            finally:
                tmp.unlink(missing_ok=True)
    except (OSError, RuntimeError) as e:
        # torch.save reports a full disk as a RuntimeError naming no cause ("unexpected pos ..."
        # or "file write failed"): the free space is what tells the reader.
        free = shutil.disk_usage(ckpt).free
        raise checkpoints.CheckpointError(
            f"rank {rank}: saving checkpoint {tag} to {ckpt} failed: {type(e).__name__}: {e}; "
            f"{free / 2**20:.1f} MiB free there. "
            f"`latest` still names {checkpoints.latest_tag(ckpt) or 'no checkpoint'}, the last complete one; "
            f"the partial {tag} is never loaded. Free space (or move output.dir), then --resume") from e
    dist.barrier()
    if rank == 0:
        tags = sorted((p for p in ckpt.glob("step*") if p.is_dir()), key=lambda p: int(p.name[4:]))
        for old in tags[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        # A universal copy made for a resume is stale once the job saves again.
        for old in ckpt.glob(checkpoints.UNIVERSAL_PREFIX + "*"):
            shutil.rmtree(old, ignore_errors=True)
        (ckpt / "latest_universal").unlink(missing_ok=True)


def _check_same_start(step: int, device) -> None:
    """Every rank must resume from the same step. They differ when OUTPUT is not on a filesystem
    shared by all nodes (DeepSpeed writes `latest` and the model states on rank 0's node only)."""
    both = torch.tensor([step, -step], dtype=torch.int64, device=device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    if int(both[0]) != -int(both[1]):
        raise RuntimeError(f"ranks resume from different steps ({-int(both[1])} to {int(both[0])}): "
                           f"--resume needs output.dir on a filesystem shared by all nodes")


def _truncate_metrics(path: Path, upto_step: int) -> None:
    """On resume, drop rows of steps after the checkpoint (they will be recomputed)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= upto_step]
    path.write_text("".join(r + "\n" for r in rows))
    if upto_step == 0:
        os.remove(path)
