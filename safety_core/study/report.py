"""What a study shows: its checks judged on a table of stage numbers (the means over seeds, or
one seed's), the terminal table (mean +/- sd), and its plots. May import the study's expr and
spec modules, the demo's aggregation and measure.plots.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from safebasin.safety_core.demo.report import aggregate, means  # noqa: F401  (re-exported: one aggregation)
from safebasin.safety_core.study import expr
from safebasin.safety_core.study.spec import Study


def checks(study: Study, stages: dict) -> dict[str, dict]:
    """{name: {ok, rule, value}}: each rule judged on `stages`; value is the rule's headline (the
    first non-constant side of its first comparison). A rule reading a missing number fails."""
    out = {}
    for name, rule in study.checks.items():
        tree = expr.parse(rule)

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


def table(study: Study, stages: dict, sd: dict | None = None) -> str:
    """One row per evaluated stage (its title), one column per metric; with `sd` (from
    `aggregate`, several seeds) every cell is mean +/- sd."""
    names = [n for n in study.stages if n in stages]
    columns = list(dict.fromkeys(m for n in names for m in stages[n]))

    def cell(stage, m):
        if m not in stages[stage]:
            return ""
        spread = (sd or {}).get(stage, {}).get(m)
        return _fmt(stages[stage][m]) + ("" if sd is None or spread is None else f" ± {_fmt(spread['sd'])}")
    head = ["stage"] + columns
    body = [[study.stages[n].title or n] + [cell(n, m) for m in columns] for n in names]
    widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in [head] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def check_lines(found: dict[str, dict]) -> str:
    return "\n".join(f"  [{'x' if c['ok'] else ' '}] {name}: {c['rule']} ({_fmt(c['value'])})"
                     for name, c in found.items())


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
