"""Curvature-aware safety restoration (DESIGN.md, "Restoration"), top to bottom.

Starting from the fine-tuned parameters theta_ft, raise the loss on harmful responses with an
influence step preconditioned by an L-BFGS inverse Hessian, as far as a budget on the task
(retain) loss allows: maximise L_forget subject to L_retain <= L_retain(theta_ft) + eps.

1. curvature pairs at theta_ft from probe steps on batches cycling over D_curv_forget,
   D_retain1 and D_retain2 (or the retain or forget sets only, or none: restore.curvature_sources;
   the buffer filters them and keeps the newest m);
2. d = H (grad L_forget - mu (theta - theta_ft));
3. the step length t* at which the quadratic model of the retain loss along d uses the budget
   left (policy.RetainModel), capped by the trust region (a norm relative to the parameters);
   accepted iff the retain loss stays within the budget and the forget loss rose; a rejected
   step is undone from a saved copy (bit-identical) and retried at most half as long (shorter
   still when the retain loss it met says so);
4. after an accepted step, the retain gradient at the new point (needed for the next direction
   anyway) measures the curvature the step really met; its ratio to the model's calibrates the
   next prediction. rho (actual / predicted retain change) moves the region (policy.TrustRegion);
5. steps 2-4 repeat up to `iterations` times, optionally re-collecting the pairs, and stop early
   when the budget is used, the direction does not raise the forget loss to first order, or no
   step within the budget raises it (the reason is logged).

Every vector here is this rank's shard of the flattened trainable parameters (spaces.py);
every inner product is reduced over ranks, so all ranks take the same decisions and N ranks
compute what one rank would.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safebasin.safety_core.distributed import all_reduce_sum, init_distributed
from safebasin.safety_core.restore.config import RestoreArgs
from safebasin.safety_core.restore.lbfgs import CurvatureBuffer
from safebasin.safety_core.restore.memory import HISTORY_DTYPES, plan_history
from safebasin.safety_core.restore.policy import RetainModel, TrustRegion, calibration, constraint_ratio
from safebasin.safety_core.restore.sets import RestoreSets, batches, build_sets
from safebasin.safety_core.restore.spaces import FlatSpace, build_space, loss_and_grad
from safebasin.safety_core.train.ds_config import DeepSpeedArgs
from safebasin.safety_core.train.modeling import (
    MethodArgs,
    ModelArgs,
    export,
    load_tokenizer,
)


@dataclass
class RestoreResult:
    out_dir: Path
    final_dir: Path
    rows: list[dict]
    summary: dict
    model: object = None  # the restored module (ZeRO-3: still partitioned), for in-process callers


def restore(model_args: ModelArgs, method: MethodArgs, args: RestoreArgs, ds_args: DeepSpeedArgs,
            out_dir: str | Path, *, log_fn: Callable[[dict, int], None] | None = None) -> RestoreResult:
    """Restore safety and export: an adapter folder when model.adapter is set, else full weights.
    `log_fn(row, iteration)` receives every iteration's metrics on rank 0."""
    out_dir = Path(out_dir)
    rank, world = init_distributed(ds_args.timeout_minutes)
    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(model_args)
    pad_id = tokenizer.pad_token_id
    sets = build_sets(args, tokenizer)
    space, stage, keep_alive = build_space(model_args, method, args, ds_args, world)
    # Before any work: a history that cannot fit fails the job now, not after the set-up.
    history_device = plan_history(args.history, space.numel, args.history_dtype, args.history_device,
                                  space.device, is_rank0=rank == 0)
    log = _IterationLog(out_dir, rank == 0, log_fn)
    forget_b = batches(sets.forget, args.batch_size)
    retain_b = batches(sets.retain1 + sets.retain2, args.batch_size)

    # Set-up at theta_ft: both losses, their gradients, and the curvature pairs.
    theta_ft = space.read().clone()
    params_norm = math.sqrt(space.dot(theta_ft, theta_ft))
    forget_loss, g_forget = loss_and_grad(space, forget_b, pad_id, grad=True)
    retain_loss, g_retain = loss_and_grad(space, retain_b, pad_id, grad=True)
    start = {"forget_loss": forget_loss, "retain_loss": retain_loss}
    buffer = CurvatureBuffer(args.history, args.pair_threshold, dtype=HISTORY_DTYPES[args.history_dtype],
                             device=history_device)
    collect_pairs(buffer, space, sets, args, pad_id, round_=0)
    region = TrustRegion(args.max_step)
    calibrated = None  # measured / model curvature along the last accepted step
    stop = f"ran the {args.iterations} iterations"

    for it in range(1, args.iterations + 1):
        t0 = time.perf_counter()
        budget = args.eps - (retain_loss - start["retain_loss"])
        if budget <= 0:
            stop = f"the budget is used before iteration {it}"
            break
        if it > 1 and args.refresh_pairs:
            buffer.reset()
            collect_pairs(buffer, space, sets, args, pad_id, round_=it - 1)
        # Direction: ascent on the forget loss, pulled back towards theta_ft, preconditioned.
        theta = space.read()
        pull_back = args.mu * (theta - theta_ft)
        sizes = {"forget_grad_norm": math.sqrt(space.dot(g_forget, g_forget)),
                 "pull_back_norm": math.sqrt(space.dot(pull_back, pull_back))}
        d = buffer.apply_inverse(g_forget - pull_back).to(theta.device)
        d_norm = math.sqrt(max(buffer.last_info.d_norm_sq, 0.0))
        # The retain loss along d: d^T B d = g^T H g from the pairs, scaled by what the last
        # accepted step measured.
        model_curvature = buffer.last_info.g_dot_d
        retain_model = RetainModel(space.dot(g_retain, d),
                                   model_curvature * (1.0 if calibrated is None else calibrated))
        forget_slope = space.dot(g_forget, d)
        if d_norm == 0:
            stop = f"iteration {it}: the direction is zero"
            break
        if forget_slope <= 0:
            # Every short enough step along d lowers the forget loss (the pull back to theta_ft
            # outweighs the forget gradient): backtracking could only end in a rejection.
            stop = (f"iteration {it}: the direction does not raise the forget loss (slope "
                    f"{forget_slope:.3g}; the pull back mu (theta - theta_ft) outweighs the forget gradient)")
            break
        t = args.eta * retain_model.step_for(budget)
        if args.delta is not None and it == 1:
            t = min(t, args.delta / d_norm)
        saved = space.snapshot()
        accepted, tries = False, 0
        while not accepted and tries <= args.max_retries:
            tries += 1
            t, capped = region.cap(t, d_norm, params_norm)
            tried = t
            space.write(theta + t * d)
            new_retain, _ = loss_and_grad(space, retain_b, pad_id, grad=False)
            new_forget, _ = loss_and_grad(space, forget_b, pad_id, grad=False)
            predicted, actual = retain_model.change(t), new_retain - retain_loss
            rho = constraint_ratio(actual, predicted)
            accepted = new_retain <= start["retain_loss"] + args.eps and new_forget > forget_loss
            region.update(t * d_norm / params_norm, rho, accepted, capped)
            if not accepted:
                space.restore(saved)
                # Half as long, or shorter where the curvature this try met puts the budget.
                met = RetainModel(retain_model.slope, 2.0 * (actual - retain_model.slope * t) / (t * t))
                t = min(0.5 * t, 0.9 * met.step_for(budget)) if new_forget > forget_loss else 0.5 * t
        # The last try's numbers (the accepted one's, if any); rho is finite for the metric store.
        row = {"tries": tries, "accepted": accepted, "budget_left": budget, "step_length": tried,
               "step_relative": tried * d_norm / params_norm, "step_norm": tried * d_norm if accepted else 0.0,
               "predicted_retain_change": predicted, "actual_retain_change": actual,
               "rho": rho if math.isfinite(rho) else 1e9,
               "predicted_forget_gain": forget_slope * tried, "actual_forget_gain": new_forget - forget_loss,
               "radius": region.radius, "pairs_kept": len(buffer),
               "curvature_model": model_curvature / (d_norm * d_norm)}
        if accepted:
            g_retain_before = g_retain
            forget_loss, g_forget = loss_and_grad(space, forget_b, pad_id, grad=True)
            retain_loss, g_retain = loss_and_grad(space, retain_b, pad_id, grad=True)
            # Curvature the retain loss really had along p = t d, per unit squared norm beside
            # the model's (both d^T B d / ||d||^2), and the calibration of the next prediction.
            measured = space.dot(g_retain - g_retain_before, d) / tried
            calibrated = calibration(measured, model_curvature)
            row["curvature_measured"] = measured / (d_norm * d_norm)
        log.write(it, {"forget_loss": forget_loss, "retain_loss": retain_loss,
                       "budget_used": (retain_loss - start["retain_loss"]) / args.eps, **row,
                       **sizes, "seconds": time.perf_counter() - t0},
                  f"(start {start['retain_loss']:.4f} + eps {args.eps})")
        if not accepted:
            stop = (f"iteration {it}: no step within the budget raised the forget loss "
                    f"({tries} tries)")
            break
    if rank == 0:
        print(f"[safebasin restore] stopped: {stop}", flush=True)

    final_dir = out_dir / ("adapter" if model_args.adapter is not None else "model")
    # From the fp32 weights the loop computed with, whatever model.dtype: a restoration step is
    # mostly below a bf16 weight's last bit, so a bf16 export would not carry what was measured.
    export(space.model, tokenizer, final_dir, zero3=stage == 3, is_rank0=rank == 0, dtype=None)
    summary = {"initial": start,
               "restored": {"forget_loss": forget_loss, "retain_loss": retain_loss},
               "accepted_steps": sum(r["accepted"] for r in log.rows), "iterations": args.iterations,
               "iterations_run": len(log.rows), "stop_reason": stop,
               "budget_used": (retain_loss - start["retain_loss"]) / args.eps,
               "parameters_norm": params_norm,
               "sizes": sets.sizes(), "trainable_parameters": int(all_reduce_sum([space.numel])[0]),
               "zero_stage": stage, "world_size": world,
               "pairs": {"offered": buffer.stats.pushes, "accepted": buffer.stats.accepted,
                         "kept": len(buffer), "curvatures": buffer.curvatures()}}
    del keep_alive
    return RestoreResult(out_dir=out_dir, final_dir=final_dir, rows=log.rows, summary=summary,
                         model=space.model)


def collect_pairs(buffer: CurvatureBuffer, space: FlatSpace, sets: RestoreSets, args: RestoreArgs,
                  pad_id: int, round_: int) -> int:
    """Probe pairs at the current parameters, cycling the sets `args.curvature_sources` names
    (mixed: D_curv_forget, D_retain1, D_retain2); each round starts further along every set's
    batches. Returns the pairs the filter accepted."""
    cycle = [batches(s, args.batch_size) for s in sets.curvature_sets(args.curvature_sources)]
    if not cycle:
        return 0
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


class _IterationLog:
    """Per-iteration rows: kept in memory, appended to OUTPUT/metrics.jsonl, passed to log_fn
    and printed, by rank 0."""

    def __init__(self, out_dir: Path, is_rank0: bool, log_fn):
        self.rows, self.is_rank0, self.log_fn = [], is_rank0, log_fn
        self.path = out_dir / "metrics.jsonl"
        if is_rank0:
            out_dir.mkdir(parents=True, exist_ok=True)
            self.path.unlink(missing_ok=True)

    def write(self, iteration: int, row: dict, retain_note: str) -> None:
        row = {"iteration": iteration, **row}
        self.rows.append(row)
        if not self.is_rank0:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.log_fn:
            self.log_fn(row, iteration)
        print(f"[safebasin restore] iteration {iteration}: forget {row['forget_loss']:.4f}, retain "
              f"{row['retain_loss']:.4f} {retain_note}, {'accepted' if row['accepted'] else 'rejected'} "
              f"after {row['tries']} tries, step {row['step_relative']:.3g} x ||theta||, forget gain "
              f"{row['actual_forget_gain']:+.4f} (predicted {row['predicted_forget_gain']:+.4f}), retain change "
              f"{row['actual_retain_change']:+.4f} (predicted {row['predicted_retain_change']:+.4f}, rho "
              f"{row['rho']:.3f}), budget used {row['budget_used']:.2f}", flush=True)
