"""One seed's study with every `${...}` reference filled in: the data and model specs, each
stage's config (its output folder set) and each evaluation suite, for the plan's order. A
reference that cannot be read is a StudyError naming where it is. May import the study's plan,
expr and spec modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from safebasin.safety_core.study import expr
from safebasin.safety_core.study.plan import JOB_COMMANDS, Plan, outputs, projected_from
from safebasin.safety_core.study.spec import StudyError, merge


@dataclass
class Resolved:
    """One seed's study with every reference filled in."""
    seed: int
    root: Path
    scope: dict
    data: dict  # {"builders": {name: (builder, args)}, "pools": {name: {...}}}
    models: dict  # name -> str (a path, hub id or builtin) or (builder, args)
    stages: dict[str, dict]  # name -> resolved config
    suites: dict[str, dict]  # name -> {"eval", "model", "job", "metrics"}
    caption: str = ""  # the study's caption, its references filled in


def resolve(plan: Plan, seed: int, root: Path) -> Resolved:
    """Every config of one seed (root: its folder), references filled in."""
    study, problems = plan.study, []
    scope: dict = {"seed": seed, "out": str(root)}

    def fill(value, where: str, extra: dict | None = None):
        def one(text: str, key: str):
            try:
                return expr.substitute(text, {**scope, **(extra or {})})
            except expr.ExprError as e:
                problems.append(f"{where}{'.' + key if key else ''}: {e}")
                return text
        return expr.walk_strings(value, one)
    scope["vars"] = fill(study.vars, "vars")
    scope["data"] = {n: str(root / "data" / f"{n}.jsonl") for n in plan.data_names}
    data = {"builders": {n: (b.builder, fill(b.args, f"data.builders.{n}.args"))
                         for n, b in study.data.builders.items()},
            "pools": {n: fill(p.model_dump(), f"data.pools.{n}") for n, p in study.data.pools.items()}}
    models = {}
    for n, m in study.models.items():
        models[n] = fill(m, f"models.{n}") if isinstance(m, str) else (m.builder, fill(m.args, f"models.{n}.args"))
    scope["models"] = {n: m if isinstance(m, str) else str(root / "models" / n) for n, m in models.items()}
    scope["stages"] = {}
    stages = {}
    for name in plan.order:
        stage, point = plan.stages[name], plan.points.get(name)
        raw = merge(study.defaults, stage.config) if stage.command in ("train", "restore") else stage.config
        cfg = fill(raw, f"stages.{name}.config", {"sweep": point.values} if point else None)
        folder = root / name
        out = {"dir": str(folder)}
        if stage.command in JOB_COMMANDS:
            cfg = merge(cfg, {"output": {"dir": str(folder)}})
        made = outputs(stage)
        if stage.command == "model":
            out["model"] = cfg.get("path")
        elif "adapter" in made and stage.command != "safe-lora-project":
            out["adapter"], out["model"] = str(folder / "adapter"), (cfg.get("model") or {}).get("path")
        elif stage.command in ("train", "restore"):
            out["model"] = str(folder / "model")
        elif stage.command == "align-basis":
            out["basis"] = str(folder)
        elif stage.command == "safe-lora-project":
            out["adapter"] = str(folder / "adapter")
            origin = projected_from(stage)
            if origin:
                out["model"] = scope["stages"][origin].get("model")
        scope["stages"][name] = out
        stages[name] = cfg
    suites = {n: {"eval": fill(s.eval, f"evals.{n}.eval"), "model": fill(s.model, f"evals.{n}.model"),
                  "job": fill(s.job, f"evals.{n}.job"), "metrics": s.metrics} for n, s in study.evals.items()}
    caption = fill(study.caption, "caption")
    if problems:
        raise StudyError(problems)
    return Resolved(seed, root, scope, data, models, stages, suites, str(caption))
