"""Restoration ablations on the demo organism: restore the attacked (plain LoRA) adapter of
finished demo folders again with one setting changed, and evaluate each result as the demo
does (held-out HRR with its breakdown, prefilling ASR, task accuracy).

    python benchmarks/restore_ablation.py runs/demo3/seed0 runs/demo3/seed1 runs/demo3/seed2 \\
        --set restore.curvature_sources=mixed,retain,forget [--out runs/ablation]

Each folder is a seed folder of the tiny study (`safebasin demo`: OUT/seed{N}); its restored
stage's config.yaml is the starting point, and its own evaluation config (OUT/evals/) measures it. Prints one row per (value, seed) and the
mean over seeds, and writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import yaml
from safebasin.launcher.config import apply_overrides, build
from safebasin.launcher.runs import launch_args
from safebasin.safety_core.study.metrics import numbers

COLUMNS = ("hrr", "refusal", "degenerate", "prefill_asr", "task_accuracy", "task_loss")


def run_one(demo: Path, key: str, value: str, out: Path) -> dict:
    from safebasin.launcher.cli import run_job
    raw = yaml.safe_load((demo / "restored" / "config.yaml").read_text())
    raw = apply_overrides(raw, [f"{key}={value}", f"output.dir={out / 'restored'}", "tracking.enabled=false"])
    summary = run_job("restore", build(raw), launch_args(1))
    done = json.loads((demo / "progress.json").read_text()) if (demo / "progress.json").is_file() else {}
    key = done.get("evals", {}).get("restored/main", {}).get("key")
    if key is None:
        raise SystemExit(f"{demo}/progress.json records no evaluation of restored: is {demo} a finished seed folder?")
    ev = yaml.safe_load((demo.parent / "evals" / key / "config.yaml").read_text())
    ev = apply_overrides(ev, [f"model.adapter={out / 'restored' / 'adapter'}", f"output.dir={out / 'eval'}"])
    result = run_job("eval", build(ev), launch_args(1))
    return {**numbers(result, ev["eval"], None), "accepted_steps": summary["accepted_steps"],
            "forget_loss": summary["restored"]["forget_loss"], "retain_loss": summary["restored"]["retain_loss"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("demos", nargs="+", type=Path, help="finished one-seed demo folders")
    p.add_argument("--set", required=True, metavar="KEY=V1,V2", help="the restore config key and its values")
    p.add_argument("--out", type=Path, default=Path("runs/restore_ablation"))
    args = p.parse_args()
    key, values = args.set.split("=", 1)
    rows = []
    for value in values.split(","):
        for demo in args.demos:
            out = args.out / f"{key.split('.')[-1]}={value}" / demo.name
            rows.append({"value": value, "demo": str(demo), **run_one(demo, key, value, out)})
    print(f"\n{key}: " + "  ".join(f"{c:>12}" for c in COLUMNS))
    for value in values.split(","):
        mine = [r for r in rows if r["value"] == value]
        for r in mine:
            print(f"  {value:>8} {Path(r['demo']).name:>8}: " + "  ".join(f"{r[c]:12.3f}" for c in COLUMNS))
        means = {c: statistics.fmean(r[c] for r in mine) for c in COLUMNS}
        sds = {c: statistics.stdev(r[c] for r in mine) if len(mine) > 1 else 0.0 for c in COLUMNS}
        print(f"  {value:>8}     mean: " + "  ".join(f"{means[c]:6.3f}±{sds[c]:.3f}" for c in COLUMNS))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{key.split('.')[-1]}.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
