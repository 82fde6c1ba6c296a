"""`safebasin eval` (generation + keyword judge) against a plain batched `generate` loop on the
same prompts, whole process included, interleaved (A, B, A, B, ...; medians).

    python benchmarks/eval_speed.py [--model builtin:tiny-llama] [--prompts 64] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import yaml
from trainer import run_process

SIDES = Path(__file__).resolve().parent / "eval_sides"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:tiny-llama")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default="/tmp/safebasin-bench-eval")
    args = p.parse_args()
    root = Path(args.out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    from safebasin.safety_core.train.data import DataSource, load_prompts
    from safebasin.safety_core.train.modeling import ModelArgs
    source = {"path": "builtin:harmful-heldout", "limit": args.prompts}
    prompts = [c.prompt_text for c in load_prompts(DataSource(**source))]
    n = len(prompts)  # the set may hold fewer than --prompts
    spec = {"model": ModelArgs(path=args.model).resolved_path(), "prompts": prompts,
            "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens}
    (root / "spec.json").write_text(json.dumps(spec))
    cfg = {"model": {"path": args.model}, "runtime": {"threads": 1},
           "eval": {"harmful": source, "judge": {"name": "keyword"}, "max_new_tokens": args.max_new_tokens,
                    "batch_size": args.batch_size},
           "tracking": {"experiment": "bench-eval", "uri": f"sqlite:///{root / 'mlflow.db'}"}}
    (root / "eval.yaml").write_text(yaml.safe_dump(cfg))
    exe = str(Path(sys.executable).with_name("safebasin"))
    walls = {"safebasin": [], "plain": []}
    for rep in range(args.reps + 1):  # round 0 warms caches and the MLflow store
        for name in walls:
            d = root / f"{name}.{rep}"
            d.mkdir(exist_ok=True)
            cmd = ([exe, "eval", str(root / "eval.yaml"), f"output.dir={d / 'run'}"] if name == "safebasin" else
                   [sys.executable, str(SIDES / "plain_generate.py"), str(root / "spec.json"), str(d / "result.json")])
            wall, _ = run_process(cmd, d / "log.txt")
            if rep:
                walls[name].append(wall)
                print(f"  {name} round {rep}: {n / wall:.2f} prompts/s ({wall:.1f} s)", flush=True)
    sb, plain = statistics.median(walls["safebasin"]), statistics.median(walls["plain"])
    line = (f"| eval, {n} prompts, {args.max_new_tokens} new tokens, whole process | safebasin "
            f"{n / sb:.2f} prompts/s ({sb:.1f} s) | plain generate {n / plain:.2f} prompts/s "
            f"({plain:.1f} s) | **{plain / sb:.3f}** (target >= 0.9) |")
    print(line)
    (root / "table.md").write_text(line + "\n")


if __name__ == "__main__":
    main()
