"""`safebasin demo`: the model-organism demo, from nothing to the table, offline and seeded.

The tiny organism is the study file examples/studies/tiny.yaml, run by the study runner
(launcher/study.py): the demo's flags and knobs are names for the study's (--quick: its preset
quick; --frontier: its sweep frontier; `attack.fraction=0.5`: `vars.attack.fraction=0.5`).
`--organism smollm2` runs the SmolLM2 organism (launcher/demo_smollm2.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from safebasin.launcher.config import ConfigError
from safebasin.launcher.runs import (  # noqa: F401  (their former home: scripts import them from here)
    EXPERIMENT,
    MARKER,
    DemoRuns,
    launch_args,
    parse_seeds,
    prepare_folder,
)

TINY = Path(__file__).resolve().parents[1] / "examples" / "studies" / "tiny.yaml"
# Demo knobs that are no var of the study file by the same name (lambda is a Python keyword, so
# the study's expressions call it lam; the frontier's lists are its sweep's grid).
RENAMED = {"anchor.lambda": "vars.anchor.lam", "frontier.variants": "sweeps.frontier.grid.variant",
           "frontier.lambdas": "sweeps.frontier.grid.lam"}
# Top-level keys of the study file an override may name as they are (e.g. seed=3, stages.lora...).
STUDY_KEYS = ("seed", "threads", "vars", "stages", "evals", "checks", "sweeps", "verdicts", "defaults", "plots",
              "caption", "tracking")


def study_overrides(overrides: list[str], study_file: Path = TINY) -> list[str]:
    """The demo's dotted overrides as the study file's: a knob of safety_core's former demo
    settings (attack.fraction, anchor.lambda, frontier.lambdas, ...) is its var; a key of the
    study file passes as it is; anything else is refused, naming the knobs there are."""
    knobs = sorted((yaml.safe_load(study_file.read_text()) or {}).get("vars") or {})
    out, problems = [], []
    for text in overrides:
        key, sep, value = text.partition("=")
        root = key.split(".")[0]
        if not sep:
            problems.append(f"override {text!r} must look like dotted.key=value")
        elif key in RENAMED:
            out.append(f"{RENAMED[key]}={value}")
        elif root == "frontier":
            problems.append(f"{key}: no knob of the frontier; its knobs: frontier.variants, frontier.lambdas")
        elif root in knobs:
            out.append(f"vars.{text}")
        elif root in STUDY_KEYS:
            out.append(text)
        else:
            problems.append(f"{key}: no knob of the tiny organism; knobs: {', '.join(knobs + ['frontier'])} "
                            f"(e.g. attack.fraction=0.5), or a key of {study_file.name}: {', '.join(STUDY_KEYS)}")
    if problems:
        raise ConfigError(problems)
    return out


def _legacy_keys(result: dict, nproc: int) -> dict:
    """The keys the demo's results.json has always had, beside the study's own."""
    first = (result.get("landscapes") or {}).get(result["seeds"][0], {})
    return {**result, "phenomenon_shown": result["all_checks_hold"],
            "anchor_verdict": (result.get("verdicts") or {}).get("anchor"),
            "frontier": (result.get("sweeps") or {}).get("frontier"), "nproc": nproc,
            "landscape": {scape["direction"]: scape for scape in first.values()} if len(result["seeds"]) == 1 else None}


def cmd_demo(args) -> int:
    from safebasin.launcher.study import execute, show
    from safebasin.safety_core.study import report, runner
    if args.organism == "smollm2":
        from safebasin.launcher import demo_smollm2
        if args.preset not in (None, "quick", "reduced"):
            raise ConfigError([f"--preset {args.preset}: --organism smollm2 has the preset reduced (--quick)"])
        args.quick = args.quick or args.preset is not None
        return demo_smollm2.cmd(args)
    if not TINY.is_file():
        raise ConfigError([f"{TINY}: the tiny organism's study file is missing (safebasin demo runs from a clone, "
                           f"installed with pip install -e)"])
    overrides = study_overrides(list(args.overrides))
    if args.frontier:
        overrides.append("sweeps.frontier.enabled=true")
    if args.quick and args.preset not in (None, "quick"):
        raise ConfigError([f"--quick is --preset quick; --preset {args.preset} asks for another"])
    study, out, result = execute(TINY, overrides, args.preset or ("quick" if args.quick else None), args,
                                 markers=(MARKER,), what="demo")
    result = _legacy_keys(result, args.nproc)
    report.write_json(result, out / runner.RESULTS)
    if args.json:
        report.write_json(result, Path(args.json))
    show(study, result, out, command="safebasin demo", holds="the phenomenon is shown", nproc=args.nproc)
    return 3 if args.check and not result["all_checks_hold"] else 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="the model-organism demo: align a tiny model, attack it with a "
                       "harmful fine-tune, anchor and restore it; offline, a few minutes on a CPU")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the organism's knobs, e.g. attack.fraction=0.3 "
                   "(the vars of examples/studies/tiny.yaml), or of any key of that study file")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo); a non-empty "
                   "one is refused (a previous demo's folder: see --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="--out holds a previous demo: move it aside "
                   "to OUT.replaced-TIME and start over (nothing is deleted)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results JSON here")
    p.add_argument("--nproc", type=int, default=1, help="ranks for the training, restoration and "
                   "evaluation stages (default 1: everything in this process)")
    p.add_argument("--organism", choices=["tiny", "smollm2"], default="tiny", help="tiny: a random tiny "
                   "Llama on synthetic data (default; examples/studies/tiny.yaml); smollm2: the real "
                   "SmolLM2-135M-Instruct on public safety data (see docs/results.md)")
    p.add_argument("--quick", action="store_true", help="every stage tiny (tests the pipeline, not "
                   "the phenomenon: the study's preset quick); with --organism smollm2, its reduced preset")
    p.add_argument("--preset", default=None, help="a preset of the study file (quick); with --organism "
                   "smollm2: reduced")
    p.add_argument("--frontier", action="store_true", help="also retrain the attack for each lambda of "
                   "each anchor variant (the study's sweep frontier; frontier.variants, frontier.lambdas) and "
                   "plot HRR against task accuracy (plots/frontier.png, plots/frontier.csv)")
    p.add_argument("--check", action="store_true", help="exit with status 3 when a check of the "
                   "phenomenon fails (with --seeds: a check on the means)")
    p.add_argument("--seeds", default=None, metavar="LIST", help="e.g. 0,1,2: run the organism once per "
                   "seed (sequentially, in OUT/seed{N}/) and report mean and sd per stage and metric; "
                   "default: the study's seed (seed=N changes it)")
    p.add_argument("--resume", action="store_true", help="continue the demo in --out (same settings): "
                   "finished stages are kept (each seed's progress.json), the rest run")
    p.add_argument("--combine", nargs="+", default=None, metavar="DIR", help="join seeds run separately "
                   "(e.g. side by side, one thread each) into one result in --out: mean and sd per stage, "
                   "the checks on the means")
    p.set_defaults(func=cmd_demo)
