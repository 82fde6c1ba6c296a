"""What a study means, checked before anything runs: the outputs each stage makes (a sweep's
points are stages too, sweep.py), the order the references between stages impose (a cycle is
refused, named), every `${...}` reference (a stage reading an output no stage makes is refused,
named), the metrics each evaluated stage gets and the checks, plots and sweeps that read them.
May import the study's spec, expr, metrics, sweep and builders modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from safebasin.safety_core.study import expr, metrics, sweep
from safebasin.safety_core.study.builders import DATA_BUILDERS, builder_problem
from safebasin.safety_core.study.spec import Stage, Study, StudyError

ROOTS = ("seed", "vars", "out", "data", "models", "stages")
JOB_COMMANDS = ("train", "restore", "eval", "landscape")


def outputs(stage: Stage) -> tuple[str, ...]:
    """The outputs a stage makes, known from its config alone."""
    cfg = stage.config
    if stage.command == "model":
        return ("model",)
    if stage.command == "train":
        full = (cfg.get("method") or {}).get("type", "lora") == "full"
        return ("model", "dir") if full else ("adapter", "model", "dir")
    if stage.command == "restore":
        return ("adapter", "model", "dir") if (cfg.get("model") or {}).get("adapter") else ("model", "dir")
    if stage.command == "align-basis":
        return ("basis", "dir")
    if stage.command == "safe-lora-project":
        return ("adapter", "model", "dir") if projected_from(stage) else ("adapter", "dir")
    return ("dir",)  # eval, landscape


def projected_from(stage: Stage) -> str | None:
    """The stage whose adapter a safe-lora-project stage projects (its model is that stage's)."""
    text = str(stage.config.get("adapter", ""))
    found = expr.references(text)
    if len(found) == 1 and text.strip() == f"${{{found[0]}}}":
        chain = expr.names(expr.parse(found[0]))
        if len(chain) == 1 and len(chain[0]) == 3 and chain[0][0] == "stages" and chain[0][2] == "adapter":
            return chain[0][1]
    return None


@dataclass
class Plan:
    study: Study
    order: list[str]
    deps: dict[str, list[str]]
    data_names: list[str]
    metrics: dict[str, dict[str, str]]  # stage -> metric -> the suite that measures it
    evaluated: list[str] = field(default_factory=list)
    # The study's stages and every enabled sweep's points (stages of their own, SWEEP-VALUE-...)
    stages: dict[str, Stage] = field(default_factory=dict)
    points: dict[str, sweep.Point] = field(default_factory=dict)
    suites: dict[str, list[str]] = field(default_factory=dict)  # stage -> the suites measuring it


def _references(value, where: str, roots: tuple[str, ...], problems: list[str]) -> list[tuple[str, ...]]:
    """Every dotted name read by the `${...}` of a nested value; bad expressions and names whose
    root is not in `roots` become problems."""
    found = []

    def visit(text: str, key: str) -> str:
        for inner in expr.references(text):
            label = f"{where}.{key}" if key else where
            try:
                tree = expr.parse(inner)
            except expr.ExprError as e:
                problems.append(f"{label}: {e}")
                continue
            for chain in expr.names(tree):
                if chain[0] not in roots:
                    problems.append(f"{label}: ${{{inner}}} reads {'.'.join(chain)}; a reference here starts "
                                    f"with one of: {', '.join(roots)}")
                else:
                    found.append(chain)
        return text
    expr.walk_strings(value, visit)
    return found


def check(study: Study) -> Plan:
    """The plan of a study, or a StudyError listing every fault found."""
    problems: list[str] = sweep.problems(study)
    names = list(study.stages)
    points = sweep.expand(study)
    stages = {**study.stages, **{n: p.stage for n, p in points.items()}}
    made = {n: outputs(s) for n, s in stages.items()}
    data_names = list(study.data_names())
    for name, b in study.data.builders.items():
        problem = builder_problem("data", f"data.builders.{name}", b.builder, b.args)
        if problem:
            problems.append(problem)
        else:
            data_names += DATA_BUILDERS[b.builder].names
        _references(b.args, f"data.builders.{name}.args", ("seed", "vars"), problems)
    for name, pool in study.data.pools.items():
        _references(pool.model_dump(), f"data.pools.{name}", ("seed", "vars"), problems)
    twice = sorted({n for n in data_names if data_names.count(n) > 1})
    if twice:
        problems.append(f"data: the names {twice} are written by more than one builder or pool")
    for name, m in study.models.items():
        if isinstance(m, str):
            _references(m, f"models.{name}", ("seed", "vars"), problems)
        else:
            problem = builder_problem("models", f"models.{name}", m.builder, m.args)
            if problem:
                problems.append(problem)
            for chain in _references(m.args, f"models.{name}.args", ("seed", "vars", "data"), problems):
                if chain[0] == "data" and (len(chain) != 2 or chain[1] not in data_names):
                    problems.append(f"models.{name}.args: ${{{'.'.join(chain)}}}: no data file of that name; "
                                    f"data files: {sorted(data_names)}")

    deps: dict[str, list[str]] = {}
    for name, stage in stages.items():
        where = f"stages.{name}.config" if name not in points else f"sweeps.{points[name].sweep} (point {name})"
        if stage.command in JOB_COMMANDS and "dir" in (stage.config.get("output") or {}):
            problems.append(f"{where}.output.dir: set by the study (SEED_FOLDER/{name}); remove it")
        deps[name] = []
        for chain in _references(stage.config, where, ROOTS + (("sweep",) if name in points else ()), problems):
            ref = "${" + ".".join(chain) + "}"
            if chain[0] == "sweep":
                continue  # its keys are checked by sweep.problems
            if chain[0] == "stages":
                if len(chain) != 3:
                    problems.append(f"stage {name}: {ref}: a stage output is read as stages.NAME.OUTPUT")
                elif chain[1] not in study.stages:
                    problems.append(f"stage {name}: {ref} reads stage {chain[1]!r}, which no stage is; "
                                    f"stages: {names}")
                elif chain[2] not in made[chain[1]]:
                    problems.append(f"stage {name}: {ref}: stage {chain[1]} ({stages[chain[1]].command}) "
                                    f"makes no {chain[2]!r}; it makes: {', '.join(made[chain[1]])}")
                elif chain[1] not in deps[name]:
                    deps[name].append(chain[1])
            elif chain[0] in ("data", "models"):
                known = data_names if chain[0] == "data" else list(study.models)
                if len(chain) != 2 or chain[1] not in known:
                    problems.append(f"stage {name}: {ref}: no {chain[0]} entry of that name; "
                                    f"{chain[0]}: {sorted(known)}")
    source = {n: projected_from(s) for n, s in stages.items() if s.command == "safe-lora-project"}
    for name, origin in source.items():
        if origin and origin in study.stages and origin not in deps[name]:
            deps[name].append(origin)
    order, cycle = _order(list(stages), deps)
    if cycle:
        problems.append(f"stages form a cycle: {' -> '.join(cycle)} (each reads the next one's output)")

    stage_metrics: dict[str, dict[str, str]] = {}
    suites_of: dict[str, list[str]] = {}
    for suite_name, suite in study.evals.items():
        _references(suite.eval, f"evals.{suite_name}.eval", ("seed", "vars", "data", "models"), problems)
        measured = list(suite.stages) + [n for n, p in points.items() if suite_name in study.sweeps[p.sweep].evals]
        for stage in measured:
            if stage not in stages:
                problems.append(f"evals.{suite_name}.stages: no stage named {stage!r}; stages: {names}")
                continue
            if "model" not in made[stage]:
                problems.append(f"evals.{suite_name}.stages: stage {stage} ({stages[stage].command}) makes "
                                f"no model to evaluate")
                continue
            suites_of.setdefault(stage, []).append(suite_name)
            for metric in _suite_metrics(study, suite_name):
                other = stage_metrics.setdefault(stage, {}).get(metric)
                if other is not None:
                    problems.append(f"evals: suites {other} and {suite_name} both give stage {stage} the metric "
                                    f"{metric!r}; rename one (the suite's metrics: mapping)")
                stage_metrics[stage][metric] = suite_name
    evaluated = [n for n in (order or names) if n in stage_metrics]
    for check_name, rule in study.checks.items():
        problems += _rule_problems(f"checks.{check_name}", rule, stage_metrics, names)
    for i, plot in enumerate(study.plots):
        for stage in plot.stages or []:
            if stage not in study.stages:
                problems.append(f"plots[{i}] ({plot.file}): no stage named {stage!r}; stages: {names}")
        for metric in plot.metrics:
            if not any(metric in m for m in stage_metrics.values()):
                problems.append(f"plots[{i}] ({plot.file}): no suite measures {metric!r}")
    _references(study.caption, "caption", ("seed", "vars"), problems)
    for name, sw in study.sweeps.items():
        measured = {m for s in sw.evals if s in study.evals for m in _suite_metrics(study, s)}
        wanted = ([sw.plot.x, sw.plot.y] if sw.plot else []) + list(sw.metrics or []) \
            + ([sw.matched.near, sw.matched.compare] if sw.matched else [])
        for metric in dict.fromkeys(wanted):
            if measured and metric not in measured:
                problems.append(f"sweeps.{name}: no suite of its evals measures {metric!r}; they measure: "
                                f"{sorted(measured)}")
    if problems:
        raise StudyError(problems)
    return Plan(study, order, deps, data_names, stage_metrics, evaluated, stages, points, suites_of)


def select(plan: Plan, names: list[str]) -> Plan:
    """The plan cut to the named stages and sweeps and every stage they read, in the same order
    (--stages): the rest is neither run nor evaluated. A sweep named runs its points (it must be
    enabled; a point may be named alone, e.g. frontier-l2-1) and the stages they read, which are
    evaluated only if a named stage reads them too (the frontier alone measures only its points);
    an unnamed sweep runs none. A name no stage or
    sweep has is refused, naming those there are."""
    study = plan.study
    enabled = {p.sweep for p in plan.points.values()}
    problems = []
    for n in names:
        if n in study.stages or n in enabled or n in plan.points:
            continue
        if n in study.sweeps:
            problems.append(f"--stages: sweep {n!r} is not enabled; add sweeps.{n}.enabled=true")
        else:
            problems.append(f"--stages: no stage named {n!r}; stages: {', '.join(study.stages)}"
                            + (f"; sweeps: {', '.join(study.sweeps)}" if study.sweeps else ""))
    if problems:
        raise StudyError(problems)
    points = {n: p for n, p in plan.points.items() if p.sweep in names or n in names}

    def closure(start: list[str]) -> set[str]:
        keep: set[str] = set()
        todo = list(start)
        while todo:
            name = todo.pop()
            if name not in keep:
                keep.add(name)
                todo += plan.deps[name]
        return keep
    measured = closure([n for n in names if n in study.stages]) | set(points)
    keep = measured | closure(list(points))
    return replace(plan, order=[n for n in plan.order if n in keep], points=points,
                   evaluated=[n for n in plan.evaluated if n in measured],
                   metrics={n: m for n, m in plan.metrics.items() if n in measured},
                   suites={n: s for n, s in plan.suites.items() if n in measured})


def _suite_metrics(study: Study, name: str) -> list[str]:
    suite = study.evals[name]
    section = expr.walk_strings(suite.eval, lambda s, _: _try_substitute(s, study))
    return metrics.names(section, suite.metrics)


def _try_substitute(text: str, study: Study):
    try:
        return expr.substitute(text, {"seed": study.seed, "vars": study.vars, "data": {}, "models": {}})
    except expr.ExprError:
        return text  # reported where the suite is resolved; only the count of prefill K matters here


def _rule_problems(where: str, rule: str, stage_metrics: dict, stages: list[str]) -> list[str]:
    try:
        tree = expr.parse(rule)
    except expr.ExprError as e:
        return [f"{where}: {e}"]
    problems = []
    for fn, args in expr.calls(tree):
        if fn in expr.FUNCTIONS:
            continue
        if len(args) != 1 or not isinstance(args[0], expr.ast.Name):
            problems.append(f"{where}: {fn}(...) takes one stage name, e.g. {fn}(lora)")
            continue
        stage = args[0].id
        if stage not in stages:
            problems.append(f"{where}: {fn}({stage}): no stage named {stage!r}; stages: {stages}")
        elif fn not in stage_metrics.get(stage, {}):
            have = sorted(stage_metrics.get(stage, {}))
            problems.append(f"{where}: {fn}({stage}): stage {stage} has no metric {fn!r}"
                            + (f"; it has: {have}" if have else " (no suite evaluates it)"))
    called = {id(n.func) for n in expr.ast.walk(tree) if isinstance(n, expr.ast.Call)}
    args = {id(a) for n in expr.ast.walk(tree) if isinstance(n, expr.ast.Call) for a in n.args}
    for node in expr.ast.walk(tree):
        if isinstance(node, (expr.ast.Name, expr.ast.Attribute)) and id(node) not in called | args:
            problems.append(f"{where}: {expr.ast.unparse(node)}: a rule reads metrics as METRIC(STAGE)")
            break
    return problems


def _order(names: list[str], deps: dict[str, list[str]]) -> tuple[list[str], list[str] | None]:
    """Stages in an order where each comes after what it reads (file order otherwise), or a cycle."""
    order, state = [], {}

    def visit(n: str, path: list[str]) -> list[str] | None:
        if state.get(n) == "done":
            return None
        if state.get(n) == "open":
            return path[path.index(n):] + [n]
        state[n] = "open"
        for d in deps.get(n, []):
            if d in deps:
                found = visit(d, path + [n])
                if found:
                    return found
        state[n] = "done"
        order.append(n)
        return None
    for n in names:
        cycle = visit(n, [])
        if cycle:
            return [], cycle
    return order, None
