"""`safebasin` console script."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from safebasin.launcher.config import ConfigError, JobConfig, load_config
from safebasin.launcher.jobs import Interrupted, JobFailed, add_job_args, run_job
from safebasin.launcher.topology import LaunchError
from safebasin.safety_core.progress import library_bars_off
from safebasin.safety_core.train.checkpoints import CheckpointError
from safebasin.safety_core.train.data import DataError
from safebasin.safety_core.train.pretrained import FetchError


def cmd_train(args) -> int:
    cfg = load_config(args.config, args.overrides)
    cfg.require("data", "train")
    print_summary(run_job("train", cfg, args), cfg)
    return 0


def print_summary(summary: dict, cfg: JobConfig) -> None:
    m = summary.get("metrics", {})
    print(f"\nsafebasin: trained {summary['steps']} steps; final loss {m.get('loss', float('nan')):.4f}"
          + (f", eval loss {m['eval_loss']:.4f}" if "eval_loss" in m else ""))
    print(f"  output:   {summary['output_dir']}")
    print(f"  exported: {summary['final']}")
    if summary.get("mlflow_run_id"):
        print(f"  MLflow:   run {summary['mlflow_run_id']} in experiment {cfg.tracking.experiment!r} at "
              f"{cfg.tracking.resolved_uri()}  (view: mlflow ui --backend-store-uri {cfg.tracking.resolved_uri()})")


def cmd_restore(args) -> int:
    cfg = load_config(args.config, args.overrides)
    cfg.require("restore")
    summary = run_job("restore", cfg, args)
    start, end = summary["initial"], summary["restored"]
    print(f"\nsafebasin: restored in {summary['iterations']} iterations ({summary['accepted_steps']} steps "
          f"accepted); forget loss {start['forget_loss']:.4f} -> {end['forget_loss']:.4f}, retain loss "
          f"{start['retain_loss']:.4f} -> {end['retain_loss']:.4f} (tolerance {cfg.restore.eps})")
    print(f"  output:   {summary['output_dir']}")
    print(f"  exported: {summary['final']}")
    if summary.get("mlflow_run_id"):
        print(f"  MLflow:   run {summary['mlflow_run_id']} in experiment {cfg.tracking.experiment!r} at "
              f"{cfg.tracking.resolved_uri()}")
    return 0


def cmd_slurm(args) -> int:
    from safebasin.launcher.slurm import sbatch_script
    load_config(args.config, args.overrides)  # fail now rather than after the job waited in the queue
    launch_args = (["--resume"] if args.resume else []) + (["--overwrite"] if args.overwrite else []) + (["--launcher", args.launcher] if args.launcher else []) \
        + (["--rank-logs", str(Path(args.rank_logs).resolve())] if args.rank_logs else [])
    text = sbatch_script(args.run, args.config, args.overrides, nodes=args.nodes,
                         gpus_per_node=args.gpus_per_node, partition=args.partition, time=args.time,
                         account=args.account, job_name=args.job_name, cpus_per_task=args.cpus_per_task,
                         launch_args=launch_args)
    if args.out is None:
        print(text, end="")
        return 0
    Path(args.out).write_text(text)
    Path(args.out).chmod(0o755)
    print(f"sbatch script for {args.nodes} nodes x {args.gpus_per_node} GPUs written to {args.out}; "
          f"submit it with: sbatch {args.out}")
    return 0


def cmd_tiny_model(args) -> int:
    from safebasin.safety_core.train.tiny import build_tiny_model
    out = build_tiny_model(args.out_dir, hidden_size=args.hidden_size, num_layers=args.layers,
                           num_heads=args.heads, num_kv_heads=args.kv_heads,
                           intermediate_size=args.intermediate_size, vocab_size=args.vocab_size,
                           seed=args.seed)
    print(f"tiny model and tokenizer written to {out}")
    return 0


def _check_out(label: str, out: str, inputs: list[tuple[str, str]]) -> None:
    """Before any work: the output folder is writable and apart from every input."""
    from safebasin.launcher.outputs import overlap_problems, writable_problem
    from safebasin.launcher.preflight import local_value
    problems = overlap_problems(label, out, [(k, local_value(v, "model")) for k, v in inputs])
    problems += [p for p in [writable_problem(label, out)] if p]
    if problems:
        raise ConfigError(problems)


def _basis_rank(text: str) -> int | str:
    if text == "full":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rank takes an integer K >= 1 or 'full', got {text!r}") from None


def cmd_align_basis(args) -> int:
    from safebasin.safety_core.anchor.basis import BasisError, extract_basis
    _check_out("--out", args.out, [("--aligned", args.aligned), ("--base", args.base)])
    try:
        manifest = extract_basis(args.aligned, args.base, args.out, modules=args.modules,
                                 variant=args.variant, rank=args.rank, tol=args.tol,
                                 device=args.device, progress=True)
    except BasisError as e:
        print(f"safebasin align-basis: {e}", file=sys.stderr)
        return 2
    ks = [info["k"] for info in manifest["layers"].values()]
    c_max = [info["c_max"] for info in manifest["layers"].values()]
    print(f"basis ({manifest['variant']}) of {len(ks)} layers written to {args.out}; "
          f"k from {min(ks)} to {max(ks)}; c_max per layer from {min(c_max):.3g} to {max(c_max):.3g}")
    return 0


def cmd_safe_lora_project(args) -> int:
    from safebasin.safety_core.anchor.basis import BasisError
    from safebasin.safety_core.anchor.safe_lora import project_adapter
    _check_out("--out", args.out, [("--adapter", args.adapter), ("--basis", args.basis)])
    try:
        report = project_adapter(args.adapter, args.basis, args.out, threshold=args.threshold,
                                 num_layers=args.num_layers)
    except BasisError as e:
        print(f"safebasin safe-lora-project: {e}", file=sys.stderr)
        return 2
    print(f"projected {report['num_projected']} of {report['num_layers']} adapted layers; "
          f"adapter and safe_lora_report.json written to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safebasin", description="Safety-anchored fine-tuning and "
                                     "curvature-aware safety restoration on DeepSpeed.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune (LoRA or full) under DeepSpeed ZeRO 0-3")
    add_job_args(p, resumable=True)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("restore", help="curvature-aware safety restoration of a fine-tuned model "
                       "(L-BFGS preconditioned, trust region on the task loss)")
    add_job_args(p)
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("slurm", help="write an sbatch script that runs a job command on N nodes "
                       "(one task per node, no ssh)")
    p.add_argument("config", help="YAML config (validated now)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, passed on to every node")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True, help="also the ranks per node")
    p.add_argument("--run", default="train", help="the job command each node runs (default train)")
    p.add_argument("--partition", default=None)
    p.add_argument("--time", default=None, help="SLURM time limit, e.g. 04:00:00")
    p.add_argument("--account", default=None)
    p.add_argument("--job-name", default="safebasin")
    p.add_argument("--cpus-per-task", type=int, default=None, help="CPUs for each node's task (all its ranks)")
    p.add_argument("--launcher", choices=["deepspeed", "torchrun"], default=None)
    p.add_argument("--rank-logs", default=None, metavar="DIR")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="the job continues from the newest checkpoint")
    again.add_argument("--overwrite", action="store_true", help="the job moves a previous job's results aside")
    p.add_argument("--out", default=None, metavar="FILE", help="write the script here (default: print it)")
    p.set_defaults(func=cmd_slurm)

    p = sub.add_parser("tiny-model", help="write a tiny random Llama model and a local tokenizer")
    p.add_argument("out_dir")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate-size", type=int, default=176)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tiny_model)
    p = sub.add_parser("align-basis", help="extract the alignment basis (U_k, c per layer) of an "
                       "aligned model relative to its base")
    p.add_argument("--aligned", required=True, help="aligned model: folder, hub id or builtin:tiny-llama")
    p.add_argument("--base", required=True, help="its pre-alignment base model, same forms")
    p.add_argument("--out", required=True, help="output folder (manifest.json + safetensors)")
    p.add_argument("--modules", default="q_proj,v_proj",
                   help="comma-separated module names whose 2-D weights are used (default q_proj,v_proj)")
    p.add_argument("--variant", choices=["safelora", "projector"], default="safelora",
                   help="safelora: c_i = sigma_i^2/||V||_F (C = V V^T/||V||_F truncated); projector: "
                   "c_i = 1, needs k < rank(V)")
    pick = p.add_mutually_exclusive_group()
    pick.add_argument("--rank", type=_basis_rank, default=None, metavar="K|full",
                      help="keep exactly K directions per layer; full: all rank(V) of them (the AsFT "
                      "reference's untruncated C)")
    from safebasin.safety_core.anchor.basis import DEFAULT_TOL, TOL_HELP
    pick.add_argument("--tol", type=float, default=None,
                      help=f"dropped-energy tolerance T (default {DEFAULT_TOL}): {TOL_HELP}".replace("%", "%%"))
    p.add_argument("--device", default=None, help="where the SVDs run (default cuda if available, else cpu)")
    p.set_defaults(func=cmd_align_basis)

    p = sub.add_parser("safe-lora-project", help="Safe LoRA: project a LoRA adapter's low-cosine "
                       "layers onto the alignment basis")
    p.add_argument("--adapter", required=True, help="PEFT adapter folder (read only)")
    p.add_argument("--basis", required=True, help="basis folder from align-basis")
    p.add_argument("--out", required=True, help="folder for the projected adapter and its report")
    rule = p.add_mutually_exclusive_group()
    rule.add_argument("--threshold", type=float, default=None,
                      help="project layers whose cosine(C B A, B A) <= T (default 0.5)")
    rule.add_argument("--num-layers", type=int, default=None, help="project the N lowest-cosine layers")
    p.set_defaults(func=cmd_safe_lora_project)
    from safebasin.launcher import measure
    measure.register(sub, add_job_args)
    from safebasin.launcher import demo, models, study
    demo.register(sub)
    models.register(sub)
    study.register(sub)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None):
    """Options and dotted overrides in any order: argparse gives the overrides positional only
    the words before the first option, so the words left over after the options are overrides
    too (for the commands that take them); anything else left over is an error."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(word.startswith("-") for word in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    return args


def _stop(signum, _frame):
    raise Interrupted(128 + signum)


# Errors the user can fix: printed as one line each, no traceback.
USER_ERRORS = (ConfigError, DataError, LaunchError, CheckpointError, FetchError)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(build_parser(), argv)
    library_bars_off()
    from safebasin.safety_core.anchor.basis import BasisError
    # SIGTERM (a scheduler, kill) ends the command like SIGINT does: through the handlers that
    # mark the MLflow run failed, with 143 rather than a bare kill.
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        code = args.func(args)
    except ConfigError as e:
        for problem in e.problems:
            print(f"safebasin {args.command}: {problem}", file=sys.stderr)
        code = 2
    except (*USER_ERRORS, BasisError) as e:
        print(f"safebasin {args.command}: {e}", file=sys.stderr)
        code = 2
    except JobFailed as e:
        print(f"safebasin {args.command}: {e}", file=sys.stderr)
        code = e.code
    except KeyboardInterrupt:
        code = 130
    except Interrupted as e:
        code = e.code
    finally:
        signal.signal(signal.SIGTERM, previous)
    if code in (130, 143):
        print(f"safebasin {args.command}: stopped by {'SIGINT' if code == 130 else 'SIGTERM'} (exit {code}); "
              f"results.json is written only by a finished job", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()
