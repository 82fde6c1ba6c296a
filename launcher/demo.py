"""`safebasin demo`: the model-organism demo, from nothing to the table, offline and seeded.

Each organism is a study file run by the study runner (launcher/study.py): the tiny one
examples/studies/tiny.yaml (the default), the SmolLM2 one examples/studies/smollm2.yaml
(`--organism smollm2`). The demo's flags and knobs are names for the study's: --quick is the
study's quick preset (smollm2: reduced), --frontier the tiny study's sweep frontier, a knob its
var (`attack.fraction=0.5`: `vars.attack.fraction=0.5`; the SmolLM2 organism's former settings by
their old names, SMOLLM2_KNOBS), `stages=[a,b]` the option --stages a,b.

Folders written by the SmolLM2 organism's own runner (before it became a study file) are refused
for --resume and --combine: commit 15277cb continues them.
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

STUDIES = Path(__file__).resolve().parents[1] / "examples" / "studies"
TINY, SMOLLM2 = STUDIES / "tiny.yaml", STUDIES / "smollm2.yaml"
ORGANISMS = {"tiny": TINY, "smollm2": SMOLLM2}
QUICK = {"tiny": "quick", "smollm2": "reduced"}  # the preset --quick names
# Demo knobs that are no var of the study file by the same name (lambda is a Python keyword, so
# the study's expressions call it lam; the frontier's lists are its sweep's grid).
RENAMED = {"anchor.lambda": "vars.anchor.lam", "frontier.variants": "sweeps.frontier.grid.variant",
           "frontier.lambdas": "sweeps.frontier.grid.lam"}
# The SmolLM2 organism's settings of commit 15277cb (safety_core/demo/smollm2.py's Smollm2Settings)
# that are no var by the same name -> the study's keys. Its sections data, aligned and attack are
# the vars of those names (data.advbench=50: vars.data.advbench=50); seed is the study's seed.
SMOLLM2_KNOBS = {
    "threads": ("threads", "vars.threads"),  # every job's threads, and the study process's own
    "aligned_modules": ("vars.aligned.trainable",), "dev_stages": ("evals.dev.stages", "evals.dev_benign.stages"),
    "lora_r": ("vars.attack.r",), "lora_alpha": ("vars.attack.alpha",),
    "target_modules": ("vars.attack.target_modules",), "anchor_lambda": ("vars.anchor.lam",),
    "anchor.lambda": ("vars.anchor.lam",), "basis_rank": ("vars.anchor.rank",),
    "safe_lora_threshold": ("vars.anchor.safe_lora_threshold",),
    "restore_iterations": ("vars.restore.iterations",), "restore_probes": ("vars.restore.probes",),
    "restore_retain": ("vars.restore.retain",), "restore_batch": ("vars.restore.batch",),
    "restore_eps": ("vars.restore.eps",), "max_new_tokens": ("vars.eval.max_new_tokens",),
    "task_max_new_tokens": ("vars.eval.task_max_new_tokens",), "prefill_k": ("vars.eval.prefill_k",),
    "eval_batch": ("vars.eval.batch",),
}
# Top-level keys of the study file an override may name as they are (e.g. seed=3, stages.lora...).
STUDY_KEYS = ("seed", "threads", "vars", "stages", "evals", "checks", "sweeps", "verdicts", "defaults", "plots",
              "caption", "tracking")


def _stage_names(value) -> list[str]:
    # the organism's stage safe-lora is the study's safe_lora (a study's names are identifiers)
    return [str(n).replace("-", "_") for n in value]


def _smollm2_value(key: str, value: str) -> str:
    """A SmolLM2 knob's value as the study takes it: module names are the study's trainable
    prefixes (q_proj -> q_proj.), stage names its identifiers."""
    if key not in ("aligned_modules", "dev_stages"):
        return value
    names = yaml.safe_load(value)
    if not isinstance(names, list):
        raise ConfigError([f"{key}={value}: a list, e.g. {key}=[q_proj,v_proj]"])
    return json.dumps([f"{m}." for m in names] if key == "aligned_modules" else _stage_names(names))


def study_overrides(overrides: list[str], study_file: Path = TINY) -> list[str]:
    """The demo's dotted overrides as the study file's: a knob of the organism's former settings
    (tiny: attack.fraction, anchor.lambda, frontier.lambdas, ...; smollm2: SMOLLM2_KNOBS and its
    sections) is its var; a key of the study file passes as it is; anything else is refused,
    naming the knobs there are."""
    knobs = sorted((yaml.safe_load(study_file.read_text()) or {}).get("vars") or {})
    smollm2 = study_file == SMOLLM2
    out, problems = [], []
    for text in overrides:
        key, sep, value = text.partition("=")
        root = key.split(".")[0]
        if not sep:
            problems.append(f"override {text!r} must look like dotted.key=value")
        elif smollm2 and key in SMOLLM2_KNOBS:
            out += [f"{target}={_smollm2_value(key, value)}" for target in SMOLLM2_KNOBS[key]]
        elif not smollm2 and key in RENAMED:
            out.append(f"{RENAMED[key]}={value}")
        elif not smollm2 and root == "frontier":
            problems.append(f"{key}: no knob of the frontier; its knobs: frontier.variants, frontier.lambdas")
        elif root in knobs:
            out.append(f"vars.{text}")
        elif root in STUDY_KEYS:
            out.append(text)
        else:
            organism = "SmolLM2" if smollm2 else "tiny"
            names = knobs + (sorted(set(SMOLLM2_KNOBS) - set(knobs)) if smollm2 else ["frontier"])
            problems.append(f"{key}: no knob of the {organism} organism; knobs: {', '.join(names)} "
                            f"(e.g. attack.fraction=0.5), or a key of {study_file.name}: {', '.join(STUDY_KEYS)}")
    if problems:
        raise ConfigError(problems)
    return out


def organism_runner_problem(folder: Path) -> str | None:
    """Why the study runner cannot continue or join a folder the SmolLM2 organism's own runner
    wrote (its marker holds settings, not a study); None for any other folder."""
    marker = folder / MARKER
    if not marker.is_file() or (folder / "study.json").is_file():
        return None
    try:
        saved = json.loads(marker.read_text())
    except ValueError:
        return None
    if not isinstance(saved, dict) or saved.get("organism") != "smollm2" or "settings" not in saved:
        return None
    return (f"{folder}: written by the SmolLM2 organism's own runner, before it became the study file "
            f"examples/studies/smollm2.yaml; the study runner cannot continue or combine it (continue it with "
            f"the organism runner of commit 15277cb: git checkout 15277cb)")


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
    study_file = ORGANISMS[args.organism]
    if not study_file.is_file():
        raise ConfigError([f"{study_file}: the {args.organism} organism's study file is missing (safebasin demo "
                           f"runs from a clone, installed with pip install -e)"])
    read = [Path(f) for f in (args.combine or [])] + ([Path(args.out)] if args.resume else [])
    problems = [p for p in map(organism_runner_problem, read) if p]
    if problems:
        raise ConfigError(problems)
    # stages=[a,b] (the SmolLM2 organism's setting) is --stages a,b
    chosen = [text.partition("=")[2] for text in args.overrides if text.partition("=")[0] == "stages"]
    if chosen:
        names = yaml.safe_load(chosen[-1])
        args.stages = ",".join(_stage_names(names if isinstance(names, list) else [names]))
    overrides = study_overrides([t for t in args.overrides if t.partition("=")[0] != "stages"], study_file)
    if args.frontier:
        if args.organism != "tiny":
            raise ConfigError([f"--frontier: the {args.organism} organism's study has no frontier sweep"])
        overrides.append("sweeps.frontier.enabled=true")
    quick = QUICK[args.organism]
    if args.quick and args.preset not in (None, "quick", quick):
        raise ConfigError([f"--quick is --preset {quick}; --preset {args.preset} asks for another"])
    preset = quick if args.quick or args.preset == "quick" else args.preset
    study, out, result = execute(study_file, overrides, preset, args, markers=(MARKER,), what="demo")
    result = _legacy_keys(result, args.nproc)
    report.write_json(result, out / runner.RESULTS)
    if args.json:
        report.write_json(result, Path(args.json))
    command = "safebasin demo" + (f" --organism {args.organism}" if args.organism != "tiny" else "")
    show(study, result, out, command=command, holds="the phenomenon is shown", nproc=args.nproc)
    return 3 if args.check and not result["all_checks_hold"] else 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="the model-organism demo: align a tiny model, attack it with a "
                       "harmful fine-tune, anchor and restore it; offline, a few minutes on a CPU")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the organism's knobs, e.g. attack.fraction=0.3 "
                   "(the vars of its study file, examples/studies/tiny.yaml or smollm2.yaml; smollm2 also takes "
                   "its former settings' names, e.g. restore_eps=0.05), or of any key of that study file")
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
    from safebasin.launcher.study import add_stages_arg
    add_stages_arg(p)
    p.add_argument("--resume", action="store_true", help="continue the demo in --out (same settings): "
                   "finished stages are kept (each seed's progress.json), the rest run")
    p.add_argument("--combine", nargs="+", default=None, metavar="DIR", help="join seeds run separately "
                   "(e.g. side by side, one thread each) into one result in --out: mean and sd per stage, "
                   "the checks on the means")
    p.set_defaults(func=cmd_demo)
