"""What a study shows: the numbers over seeds (mean, sd), its checks judged on a table of stage
numbers (the means over seeds, or one seed's), its verdicts (plain sentences), the terminal
table (mean +/- sd) and its plots. May import the study's expr and spec modules and measure.plots.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from safebasin.safety_core.study import expr
from safebasin.safety_core.study.spec import Study, Verdict

# Column headers of the standard numbers (metrics.py); any other metric is headed by its name.
HEADERS = {"hrr": "HRR", "refusal": "refusal", "degenerate": "degen.", "prefill_asr": "prefill ASR",
           "prefill_degenerate": "pf degen.", "task_accuracy": "task acc", "task_loss": "task loss"}


def aggregate(per_seed: list[dict]) -> dict[str, dict[str, dict]]:
    """{stage: {metric: {mean, sd, values}}} over the seeds' stage numbers (sd: sample standard
    deviation, 0 for one seed; None values left out). A stage some seeds lack (it was added to
    fewer seeds) is aggregated over the seeds that have it: `values` says how many."""
    out: dict = {}
    stages = list(dict.fromkeys(stage for run in per_seed for stage in run))
    for stage in stages:
        having = [run[stage] for run in per_seed if stage in run]
        out[stage] = {}
        for metric in having[0]:
            values = [row[metric] for row in having if row.get(metric) is not None]
            out[stage][metric] = {
                "mean": statistics.fmean(values) if values else None,
                "sd": statistics.stdev(values) if len(values) > 1 else (0.0 if values else None),
                "values": values}
    return out


def means(agg: dict) -> dict:
    """The stage table of the means, the shape `checks` takes."""
    return {stage: {m: v["mean"] for m, v in row.items()} for stage, row in agg.items()}


def checks(study: Study, stages: dict) -> dict[str, dict]:
    """{name: {ok, rule, value}}: each rule judged on `stages`; value is the rule's headline (the
    first non-constant side of its first comparison). A rule reading a missing number fails; one
    reading a stage with no row at all (not run: --stages) is not evaluated, ok None."""
    out = {}
    for name, rule in study.checks.items():
        tree = expr.parse(rule)
        read = {args[0].id for fn, args in expr.calls(tree)
                if fn not in expr.FUNCTIONS and isinstance(args[0], expr.ast.Name)}
        if read - set(stages):
            out[name] = {"ok": None, "rule": rule, "value": None}
            continue

        def metric(fn, args):
            value = stages.get(args[0].id, {}).get(fn)
            if value is None:
                raise LookupError(f"{fn}({args[0].id})")
            return value
        try:
            ok = bool(expr.evaluate(tree, {}, metric))
            value = expr.evaluate(expr.headline(tree), {}, metric)
        except LookupError:
            ok, value = False, None
        out[name] = {"ok": ok, "rule": rule, "value": value if isinstance(value, (int, float)) else None}
    return out


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def table(study: Study, stages: dict, sd: dict | None = None, caption: str = "") -> str:
    """One row per evaluated stage (its title), one column per metric (HEADERS); with `sd` (from
    `aggregate`, several seeds) every cell is mean +/- sd; the caption under it."""
    names = [n for n in study.stages if n in stages]
    columns = list(dict.fromkeys(m for n in names for m in stages[n]))

    def cell(stage, m):
        if m not in stages[stage]:
            return ""
        spread = (sd or {}).get(stage, {}).get(m)
        return _fmt(stages[stage][m]) + ("" if sd is None or spread is None else f" ± {_fmt(spread['sd'])}")
    head = ["stage"] + [HEADERS.get(m, m) for m in columns]
    body = [[study.stages[n].title or n] + [cell(n, m) for m in columns] for n in names]
    widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in [head] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + ([caption] if caption else []))


def check_lines(found: dict[str, dict]) -> str:
    return "\n".join(f"  [-] {name}: {c['rule']} (not evaluated: a stage it reads did not run)" if c["ok"] is None
                     else f"  [{'x' if c['ok'] else ' '}] {name}: {c['rule']} ({_fmt(c['value'])})"
                     for name, c in found.items())


def all_hold(found: dict[str, dict]) -> bool:
    """Every evaluated check holds (a check over a stage that did not run is left out)."""
    return all(c["ok"] for c in found.values() if c["ok"] is not None)


def anchor_verdict(stages: dict, method: str = "asft", control: str = "l2",
                   also: tuple[str, ...] = ("aligned_control",), within: float = 0.02) -> str:
    """One plain sentence: does the anchor (`method`) do more than shrink the update (`control`:
    plain L2 at the same lambda), at task accuracies within `within`, in this run?"""
    shown = [n for n in (method, control, *also) if n in stages]  # a study may lack a control
    asft, l2 = stages[method], stages[control]
    hrrs = ", ".join(f"{n} {stages[n]['hrr']:.3f}" for n in shown)
    accuracies = " / ".join(f"{stages[n]['task_accuracy']:.3f}" for n in shown)
    numbers = f"HRR {hrrs} at task accuracy {accuracies}"
    if abs(asft["task_accuracy"] - l2["task_accuracy"]) > within:
        return f"AsFT and the L2 control are not at matched accuracy ({numbers}); compare the frontier (--frontier)."
    if asft["hrr"] < l2["hrr"]:
        return f"AsFT beats plain L2 shrinkage of the update at matched accuracy ({numbers})."
    if asft["hrr"] == l2["hrr"]:
        return (f"AsFT does only as well as plain L2 shrinkage of the update ({numbers}): in this run the "
                f"anchor's direction adds nothing measurable to its magnitude.")
    return (f"AsFT does NOT beat plain L2 shrinkage of the update at matched accuracy ({numbers}): in this "
            f"run the anchor's direction does not help.")


def verdict(spec: Verdict, stages: dict) -> str | None:
    """A verdict's sentence on a table of stage numbers; None when a stage it reads has no numbers."""
    needed = (spec.method, spec.control)
    if any(stages.get(n, {}).get(m) is None for n in needed for m in ("hrr", "task_accuracy")):
        return None
    return anchor_verdict(stages, spec.method, spec.control, tuple(spec.also), spec.within)


def landscapes(study: Study, root: Path) -> dict[str, dict]:
    """Each landscape stage's safety landscape of one seed (its job's results.json): per direction
    the alphas, HRR and degenerate share per alpha, the basin width, the threshold and the PNG."""
    out = {}
    for name, stage in study.stages.items():
        path = root / name / "results.json"
        if stage.command != "landscape" or not path.is_file():
            continue
        scape = json.loads(path.read_text()).get("safety_landscape")
        if not scape:
            continue
        for direction, curve in scape["curves"].items():
            out[f"{name}/{direction}" if len(scape["curves"]) > 1 else name] = {
                "direction": direction, "alphas": scape["alphas"], "hrr": curve,
                "degenerate": scape["degenerate"][direction], "basin": scape["basin"][direction],
                "threshold": scape["threshold"], "png": scape["files"].get("png")}
    return out


def bar_plots(study: Study, stages: dict, out_dir: Path) -> dict[str, str]:
    from safebasin.safety_core.measure import plots
    files = {}
    for plot in (p for p in study.plots if p.kind == "bars"):
        names = [n for n in (plot.stages or study.stages) if n in stages]
        series = {m: [stages[n].get(m) or 0.0 for n in names] for m in plot.metrics}
        files[plot.file] = str(plots.bar_plot(out_dir / plot.file, names, series, ylabel=plot.ylabel,
                                              title=plot.title))
    return files


def training_plots(study: Study, root: Path, out_dir: Path) -> dict[str, str]:
    """Each `training` plot of one seed: a metrics.jsonl column of its stages over steps."""
    from safebasin.safety_core.measure import plots
    files = {}
    for plot in (p for p in study.plots if p.kind == "training"):
        curves = {}
        for name in plot.stages or study.stages:
            path = root / name / "metrics.jsonl"
            rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
            curves[name] = {r["step"]: r[plot.metric] for r in rows if r.get(plot.metric) is not None}
        steps = sorted({s for c in curves.values() for s in c})
        if steps:
            files[plot.file] = str(plots.line_plot(out_dir / plot.file, steps,
                                                   {n: [c.get(s) for s in steps] for n, c in curves.items()},
                                                   xlabel="optimizer step", ylabel=plot.ylabel or plot.metric,
                                                   title=plot.title))
    return files


def write_json(result: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return path
