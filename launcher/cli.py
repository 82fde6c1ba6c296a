"""`safebasin` console script."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safebasin.launcher.config import ConfigError, JobConfig, dump, load_config
from safebasin.launcher.topology import LaunchError, add_launch_args, describe, resolve
from safebasin.safety_core.progress import library_bars_off
from safebasin.safety_core.train.checkpoints import CheckpointError, convert_if_needed
from safebasin.safety_core.train.data import DataError


def _add_job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. deepspeed.stage=3 train.max_steps=20")
    add_launch_args(p)


def prepare_output(cfg: JobConfig, resume: bool) -> Path:
    """Refuse to run over a previous job's results unless resuming; write the resolved config."""
    out = Path(cfg.output.dir)
    if not resume and (out / "checkpoints").exists():
        raise ConfigError([f"output.dir {out} already holds checkpoints of a job: pass --resume to "
                           f"continue it, or choose another output.dir"])
    return dump(cfg, out / "config.yaml")


def run_job(command: str, cfg: JobConfig, args) -> dict:
    """Run a rank command (entry.RANK_COMMANDS) on the ranks the launch options ask for: this
    process, this node, this node's share of a per-node launch, or a hostfile's hosts. Returns
    rank 0's summary, which every rank command also writes to OUTPUT/results.json. On a node
    other than node rank 0 it ends the process once the node's ranks are done (the summary is
    printed by node 0, whose disk holds it when OUTPUT is not shared)."""
    resume = getattr(args, "resume", False)
    topo = resolve(args)
    resolved = prepare_output(cfg, resume)
    if resume and topo.node_rank == 0:
        # Before any rank starts: other nodes' ranks wait in the rendezvous meanwhile.
        universal = convert_if_needed(Path(cfg.output.dir) / "checkpoints", topo.world_size)
        if universal is not None:
            print(f"safebasin {command}: the checkpoint was saved at another world size; resuming "
                  f"from its universal form {universal}")
    rank_logs = getattr(args, "rank_logs", None)
    # A rank log is written by the wrapper a launcher puts around each rank, so a one-rank job
    # that asks for one goes through the launcher too.
    if topo.in_process and rank_logs is None:
        from safebasin.launcher.entry import RANK_COMMANDS
        from safebasin.launcher.launch import single_process_env
        single_process_env(replace=True)
        return RANK_COMMANDS[command](load_config(resolved), resume)
    from safebasin.launcher.launch import launch
    # A built-in model is built into this node's cache here, once: ranks cannot build it
    # (transformers' save_pretrained writes nothing on a rank other than 0 once
    # torch.distributed is up, and concurrent ranks would race for the cache folder).
    cfg.model.resolved_path()
    print(f"safebasin {command}: {describe(topo)}", flush=True)
    code = launch(command, resolved, topo, ["--resume"] if resume else [], rank_log_dir=rank_logs)
    if code != 0:
        raise SystemExit(code)
    if topo.node_rank > 0:
        print(f"safebasin {command}: the ranks of node {topo.node_rank} finished; node 0 reports the result")
        raise SystemExit(0)
    return json.loads((Path(cfg.output.dir) / "results.json").read_text())


def cmd_train(args) -> int:
    cfg = load_config(args.config, args.overrides)
    cfg.require("data", "train")
    if cfg.anchor is not None and cfg.anchor.basis_problem():
        raise ConfigError([f"anchor.basis: {cfg.anchor.basis_problem()}"])
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
    launch_args = (["--resume"] if args.resume else []) + (["--launcher", args.launcher] if args.launcher else []) \
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


def cmd_align_basis(args) -> int:
    from safebasin.safety_core.anchor.basis import BasisError, extract_basis
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
    _add_job_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("restore", help="curvature-aware safety restoration of a fine-tuned model "
                       "(L-BFGS preconditioned, trust region on the task loss)")
    _add_job_args(p)
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
    p.add_argument("--resume", action="store_true", help="the job continues from the newest checkpoint")
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
    pick.add_argument("--rank", type=int, default=None, help="keep exactly K directions per layer")
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
    measure.register(sub, _add_job_args)
    from safebasin.launcher import demo
    demo.register(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    library_bars_off()
    try:
        code = args.func(args)
    except (ConfigError, DataError, LaunchError, CheckpointError) as e:
        print(f"safebasin {args.command}: {e}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()
