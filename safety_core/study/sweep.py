"""A study's sweeps: a stage run again at every point of a grid (the lambda frontier: the attack
for each anchor variant and lambda, the AsFT paper's Fig. 4a). Each point is a stage of its own,
named SWEEP-VALUE-VALUE (frontier-safelora-10), so it is run, resumed, cached and tracked as any
stage; after the seeds, its rows (the grid values and the point's numbers) are written as
plots/FILE.csv and plots/FILE.png, per seed and as the means over seeds, with the pairs of
points at matched task accuracy. May import the study's spec and expr modules and measure.plots.
"""

from __future__ import annotations

import csv
import itertools
import statistics
from dataclasses import dataclass
from pathlib import Path

from safebasin.safety_core.study import expr
from safebasin.safety_core.study.spec import Stage, Study, Sweep, merge


@dataclass(frozen=True)
class Point:
    sweep: str
    values: dict  # grid key -> this point's value
    stage: Stage


def _label(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def expand(study: Study) -> dict[str, Point]:
    """Every point of every enabled sweep, in grid order (the first key outermost)."""
    points = {}
    for name, sweep in study.sweeps.items():
        template = study.stages.get(sweep.stage)
        if not sweep.enabled or template is None:
            continue
        keys = list(sweep.grid)
        for combo in itertools.product(*(sweep.grid[k] for k in keys)):
            values = dict(zip(keys, combo))
            stage = Stage(command=template.command, config=merge(template.config, sweep.config))
            points["-".join([name, *(_label(v) for v in combo)])] = Point(name, values, stage)
    return points


def problems(study: Study) -> list[str]:
    """A sweep's stage, suites and grid references, checked whether or not it is enabled."""
    found = []
    for name, sweep in study.sweeps.items():
        where = f"sweeps.{name}"
        if sweep.stage not in study.stages:
            found.append(f"{where}.stage: no stage named {sweep.stage!r}; stages: {list(study.stages)}")
        for suite in sweep.evals:
            if suite not in study.evals:
                found.append(f"{where}.evals: no suite named {suite!r}; suites: {list(study.evals)}")

        def visit(text: str, key: str) -> str:
            for inner in expr.references(text):
                try:
                    chains = expr.names(expr.parse(inner))
                except expr.ExprError:
                    continue  # reported with the point's other references
                for chain in chains:
                    if chain[0] == "sweep" and (len(chain) != 2 or chain[1] not in sweep.grid):
                        found.append(f"{where}.config.{key}: ${{{inner}}}: the grid has no such key; grid keys: "
                                     f"{list(sweep.grid)}")
            return text
        expr.walk_strings(sweep.config, visit)
        keys = list(sweep.grid) + list(sweep.columns.values())
        for part, key in (("plot.curve", sweep.plot and sweep.plot.curve), ("plot.label", sweep.plot and sweep.plot.label),
                          ("matched.key", sweep.matched and sweep.matched.key),
                          ("matched.by", sweep.matched and sweep.matched.by)):
            if key and key not in keys:
                found.append(f"{where}.{part}: {key!r} is no grid key; grid keys: {list(sweep.grid)}")
        for key in sweep.columns:
            if key not in sweep.grid:
                found.append(f"{where}.columns: {key!r} is no grid key; grid keys: {list(sweep.grid)}")
    return found


def rows(sweep: Sweep, points: dict[str, Point], numbers: dict[str, dict]) -> list[dict]:
    """One row per point of the sweep that has numbers: its grid values (named by `columns`),
    its metrics (`metrics`, or every one) and its stage name."""
    out = []
    for name, point in points.items():
        if name not in numbers:
            continue
        metrics = numbers[name] if sweep.metrics is None else {m: numbers[name].get(m) for m in sweep.metrics}
        out.append({**{sweep.columns.get(k, k): v for k, v in point.values.items()}, **metrics, "stage": name})
    return out


def mean_rows(sweep: Sweep, per_seed: list[list[dict]]) -> list[dict]:
    """The rows of several seeds as one: each point's numbers averaged over the seeds that have it
    (a seed without a number for it is left out of that mean), with their sample sd (METRIC_sd,
    None from one seed) and how many seeds have the point (`seeds`)."""
    grid = {sweep.columns.get(k, k) for k in sweep.grid} | {"stage"}
    by_stage: dict[str, list[dict]] = {}
    for seed_rows in per_seed:
        for row in seed_rows:
            by_stage.setdefault(row["stage"], []).append(row)
    out = []
    for rs in by_stage.values():
        row, spread = dict(rs[0]), {}
        for k in list(row):
            if k not in grid:
                values = [r[k] for r in rs if r.get(k) is not None]
                row[k] = statistics.fmean(values) if values else None
                spread[f"{k}_sd"] = statistics.stdev(values) if len(values) > 1 else None
        stage = row.pop("stage")
        out.append({**row, **spread, "seeds": len(rs), "stage": stage})
    return out


def write(sweep: Sweep, name: str, table: list[dict], out_dir: Path) -> dict[str, str]:
    """FILE.csv (one row per point) and, with a plot, FILE.png (y against x, one curve per value of
    the curve key, each point labelled with its label value)."""
    from safebasin.safety_core.measure import plots
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = sweep.file or name
    table_path = out_dir / f"{stem}.csv"
    columns = list(dict.fromkeys(k for row in table for k in row if k != "stage")) + ["stage"]
    with table_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in table:
            writer.writerow(row)
    files = {"csv": str(table_path)}
    if sweep.plot is not None and table:
        p = sweep.plot
        curve, label = sweep.columns.get(p.curve, p.curve), sweep.columns.get(p.label, p.label)
        curves, errors = {}, {}
        for value in dict.fromkeys(r[curve] for r in table):
            mine = sorted((r for r in table if r[curve] == value), key=lambda r: r[label])
            curves[str(value)] = ([r[p.x] for r in mine], [r[p.y] for r in mine], [_label(r[label]) for r in mine])
            errors[str(value)] = ([r.get(f"{p.x}_sd") or 0.0 for r in mine], [r.get(f"{p.y}_sd") or 0.0 for r in mine])
        several = any(r.get("seeds", 1) > 1 for r in table)
        title = p.title + (" (mean ± sd over seeds)" if several else "")
        files["png"] = str(plots.curves_plot(out_dir / f"{stem}.png", curves, xlabel=p.xlabel or p.x,
                                             ylabel=p.ylabel or p.y, title=title,
                                             errors=errors if several else None))
    return files


def matched(sweep: Sweep, per_seed: list[list[dict]]) -> list[dict]:
    """For every point of the method and of each curve in `also`: the control's best point (the
    lowest `compare`) among those whose `near` value lies within `within` of it, with the gap
    (that point - control) in `near` and in `compare` and the seeds' sd of `compare` at both.
    Against the control's best, not any of its points: the control's frontier at that accuracy
    (a strong lambda of the control reaches what a strong lambda of the method does). Each pair
    is measured on the seeds that have both points (`seeds`): a seed's alignment moves all its
    points together, so means over different sets of seeds are not comparable."""
    m = sweep.matched
    if m is None:
        return []
    key, by = sweep.columns.get(m.key, m.key), sweep.columns.get(m.by, m.by)
    by_stage: dict[str, dict[int, dict]] = {}
    for seed, seed_rows in enumerate(per_seed):
        for row in seed_rows:
            by_stage.setdefault(row["stage"], {})[seed] = row

    def summary(stage: str, seeds: list[int], metric: str) -> tuple[float | None, float | None]:
        values = [by_stage[stage][s].get(metric) for s in seeds]
        if None in values:
            return None, None
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None

    def of(stage: str, name: str):
        return next(iter(by_stage[stage].values()))[name]

    controls = [st for st in by_stage if of(st, key) == m.control]
    pairs = []
    for arm in (m.method, *m.also):
        for a in (st for st in by_stage if of(st, key) == arm):
            reach = []
            for b in controls:
                seeds = sorted(by_stage[a].keys() & by_stage[b].keys())
                if not seeds:
                    continue  # no seed ran both: nothing to compare them on
                (a_near, _), (b_near, _) = summary(a, seeds, m.near), summary(b, seeds, m.near)
                (a_cmp, a_sd), (b_cmp, b_sd) = summary(a, seeds, m.compare), summary(b, seeds, m.compare)
                if None in (a_near, b_near, a_cmp, b_cmp) or abs(a_near - b_near) > m.within:
                    continue
                reach.append({key: arm, by: of(a, by), f"control_{by}": of(b, by),
                              f"{m.near}_gap": a_near - b_near, f"{m.compare}_gap": a_cmp - b_cmp,
                              f"{m.compare}": a_cmp, f"control_{m.compare}": b_cmp, f"{m.compare}_sd": a_sd,
                              f"control_{m.compare}_sd": b_sd, "seeds": len(seeds)})
            if reach:
                pairs.append(min(reach, key=lambda p: p[f"control_{m.compare}"]))
    return pairs


def verdict(sweep: Sweep, table: list[dict], pairs: list[dict]) -> str | None:
    """In words: does any curve give a lower `compare` (HRR) than the control at the same `near`
    (accuracy), beyond the seeds' spread? Per curve, its best point against the control's best
    within reach (the lowest gap: a choice made after seeing the numbers, which favours finding
    a difference) is beyond the spread when the gap is below -(sd of the point + sd of the
    control point). None without matching."""
    m = sweep.matched
    if m is None or not table:
        return None
    key, by = sweep.columns.get(m.key, m.key), sweep.columns.get(m.by, m.by)
    seeds = max(r.get("seeds", 1) for r in table)
    parts, better = [], []
    for arm in (m.method, *m.also):
        mine = [p for p in pairs if p[key] == arm]
        if not [r for r in table if r[key] == arm]:
            continue
        if not mine:
            parts.append(f"{arm}: no point within {m.within:g} {m.near} of a {m.control} point")
            continue
        best = min(mine, key=lambda p: p[f"{m.compare}_gap"])
        sds = [best[f"{m.compare}_sd"], best[f"control_{m.compare}_sd"]]
        spread = sum(s for s in sds if s is not None)
        # a pair measured on one seed has no spread of its own: no verdict on it
        beyond = best[f"{m.compare}_gap"] < -spread if None not in sds else None
        if beyond:
            better.append(arm)
        where = "beyond" if beyond else ("within" if beyond is False else "one seed: no spread to compare with")
        parts.append(f"{arm} {by} {_label(best[by])} vs {m.control} {_label(best[f'control_{by}'])}: {m.compare} "
                     f"{best[m.compare]:.3f} vs {best[f'control_{m.compare}']:.3f} (gap "
                     f"{best[f'{m.compare}_gap']:+.3f}, spread {spread:.3f}: {where}; {best['seeds']} seed(s); best of "
                     f"{len(mine)} points)")
    head = (f"At matched {m.near} (within {m.within:g}), means over the seeds that have both points (of "
            f"{seeds}), each curve's best point against {m.control}'s best point within reach: "
            + "; ".join(parts) + ". ")
    if seeds < 2:
        return head + "One seed: no verdict on the spread."
    if better:
        return head + (f"Verdict: {', '.join(better)} give(s) lower {m.compare} than {m.control} at the same "
                       f"{m.near}, beyond the seeds' spread.")
    return head + (f"Verdict: no curve gives lower {m.compare} than {m.control} at the same {m.near} beyond the "
                   f"seeds' spread.")
