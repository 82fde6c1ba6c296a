"""The lambda frontier (`safebasin demo --frontier`, the AsFT paper's Fig. 4a): the attack
retrained for every lambda of every anchor variant, each point's held-out HRR against its task
accuracy, written as one CSV and one PNG. A variant that anchors by direction sits below plain
L2 shrinkage (`l2`) at the same task accuracy; one that only shrinks sits on the L2 curve.
"""

from __future__ import annotations

import csv
from pathlib import Path

from safebasin.safety_core.measure import plots

COLUMNS = ("variant", "lambda", "hrr", "prefill_asr", "task_accuracy", "task_loss", "stage")


def points(variants: list[str], lambdas: list[float]) -> list[tuple[str, float, str]]:
    """(variant, lambda, stage name) of every frontier point, in run order."""
    return [(v, lam, f"frontier-{v}-{lam:g}") for v in variants for lam in lambdas]


def write(rows: list[dict], out_dir: str | Path) -> dict[str, str]:
    """frontier.csv (one row per point) and frontier.png (HRR against task accuracy, one curve
    per variant, each point labelled with its lambda)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = out / "frontier.csv"
    with table.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in COLUMNS})
    curves = {}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["lambda"])
        curves[variant] = ([r["task_accuracy"] for r in mine], [r["hrr"] for r in mine],
                           [f"{r['lambda']:g}" for r in mine])
    png = plots.curves_plot(out / "frontier.png", curves, xlabel="held-out task accuracy",
                            ylabel="HRR (held-out harmful prompts)",
                            title="attack under each anchor variant, per lambda")
    return {"csv": str(table), "png": str(png)}


def matched(rows: list[dict], variant: str, control: str, tolerance: float) -> list[dict]:
    """Every pair (variant point, control point) whose task accuracies lie within `tolerance`,
    with the HRR difference (variant - control): the comparison at matched accuracy."""
    mine = [r for r in rows if r["variant"] == variant]
    theirs = [r for r in rows if r["variant"] == control]
    return [{"lambda": a["lambda"], "control_lambda": b["lambda"],
             "accuracy_gap": a["task_accuracy"] - b["task_accuracy"], "hrr_gap": a["hrr"] - b["hrr"]}
            for a in mine for b in theirs if abs(a["task_accuracy"] - b["task_accuracy"]) <= tolerance]
