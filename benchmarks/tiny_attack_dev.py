"""Choosing the tiny organism's attack on development prompts (issue 26: the attack must erode
safety by >= 0.2 HRR on every seed, chosen on prompts the demo does not report).

The development prompts are the held-out pool's prompts the demo never evaluates: the demo
reports heldout_prompts(48, seed + 3), the first 48 of a fixed order of the pool's 72; these
are the other 24 (other request frames of the held-out topics; no stage trains on any of them).

For each finished seed folder of the tiny study (`safebasin demo --seeds 0,1,2` or `safebasin
study examples/studies/tiny.yaml`: OUT/seed<N>, with its aligned model and data) and each attack
setting, the seed's own attack config (its lora/config.yaml, the safety probe left out) is
trained and the adapter and the aligned model are evaluated on the development prompts, with
the seed's own evaluation config. Prints one line per setting: dev HRR(lora) - dev HRR(aligned)
per seed, and task accuracy.

    python benchmarks/tiny_attack_dev.py runs/demo3/seed0 runs/demo3/seed1 runs/demo3/seed2 --out runs/tiny_attack_dev
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from safebasin.safety_core.train.synthetic import heldout_prompts, write_jsonl

SETTINGS = [  # (fraction, lr, steps)
    (0.3, 2e-3, 35), (0.5, 2e-3, 35), (0.7, 2e-3, 35), (0.3, 5e-3, 35), (0.5, 5e-3, 35), (0.7, 5e-3, 35),
    (0.3, 3e-3, 35), (0.5, 3e-3, 35),
]


def run(command: str, cfg: dict, path: Path, threads: int = 1) -> dict:
    done = Path(cfg["output"]["dir"]) / "results.json"
    if done.is_file():  # a finished job of an earlier invocation (the sweep resumes)
        return json.loads(done.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    res = subprocess.run([sys.executable, "-m", "safebasin.launcher.cli", command, str(path)],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    if res.returncode != 0:
        raise SystemExit(f"{command} {path} failed:\n{res.stderr[-3000:]}")
    return json.loads((Path(cfg["output"]["dir"]) / "results.json").read_text())


def eval_config(seed_dir: Path) -> dict:
    """The config of the seed's evaluation of its aligned model (suite main, in OUT/evals/)."""
    progress = json.loads((seed_dir / "progress.json").read_text())
    key = progress["evals"]["aligned/main"]["key"]
    return yaml.safe_load((seed_dir.parent / "evals" / key / "config.yaml").read_text())


def dev_eval(seed_dir: Path, name: str, adapter: str | None, dev: Path, out: Path) -> dict:
    cfg = eval_config(seed_dir)
    cfg["model"] = {"path": str(seed_dir / "aligned" / "model"), **({"adapter": adapter} if adapter else {})}
    cfg["eval"]["harmful"] = {"path": str(dev)}
    cfg["output"] = {"dir": str(out / name / "eval")}
    cfg["tracking"] = {"enabled": False}
    return run("eval", cfg, out / name / "eval.yaml")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("demos", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    table: dict = {}
    for demo in args.demos:
        spec = json.loads((demo.parent / "study.json").read_text())["spec"]
        seed = int(demo.name.removeprefix("seed"))
        out = args.out / f"seed{seed}"
        dev = write_jsonl(heldout_prompts(72, seed + 3)[spec["vars"]["data"]["heldout"]:], out / "dev.jsonl")
        aligned = dev_eval(demo, "aligned", None, dev, out)
        for fraction, lr, steps in SETTINGS:
            name = f"p{fraction}_lr{lr}_s{steps}"
            cfg = yaml.safe_load((demo / "lora" / "config.yaml").read_text())
            cfg["data"]["harmful_mix"]["fraction"] = fraction
            cfg["train"].update(lr=lr, max_steps=steps, warmup_steps=max(1, steps // 20))
            cfg["train"].pop("safety_probe")
            cfg["output"] = {"dir": str(out / name / "train")}
            cfg["tracking"] = {"enabled": False}
            run("train", cfg, out / name / "train.yaml")
            ev = dev_eval(demo, name, str(out / name / "train" / "adapter"), dev, out)
            table.setdefault(name, {})[seed] = (ev["hrr"] - aligned["hrr"], ev["task_accuracy"])
            print(f"seed {seed} {name}: dev HRR {ev['hrr']:.3f} (aligned {aligned['hrr']:.3f}), "
                  f"task acc {ev['task_accuracy']:.3f}", flush=True)
    print("\nsetting: dev HRR(lora) - HRR(aligned) per seed (task accuracy)")
    for name, per_seed in table.items():
        print(f"{name}: " + ", ".join(f"seed {s} {d:+.3f} ({a:.3f})" for s, (d, a) in sorted(per_seed.items())))
    (args.out / "dev_attack.json").write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
