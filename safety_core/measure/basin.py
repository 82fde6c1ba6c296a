"""Safety landscapes: HRR (or harmful-response loss) along theta + a d for named directions
(alignment direction, fine-tuning delta, random ones), and the basin width around a = 0.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Literal, Mapping

import torch
from pydantic import Field, field_validator
from safebasin.safety_core.args import Section
from safebasin.safety_core.distributed import is_main
from safebasin.safety_core.measure.correlation import example_nll, mean_nll
from safebasin.safety_core.measure.directions import (
    check_shapes,
    perturbed,
    random_direction,
    select_parameters,
)
from safebasin.safety_core.measure.evaluation import judge_generations
from safebasin.safety_core.measure.generation import generate
from safebasin.safety_core.measure.judges import Judge, JudgeArgs, make_judge, summarize
from safebasin.safety_core.progress import track
from safebasin.safety_core.train.data import (
    Conversation,
    DataSource,
    load_conversations,
    load_prompts,
)


class SafetyLandscapeArgs(Section):
    harmful: DataSource
    metric: Literal["hrr", "loss"] = Field("hrr", description="hrr: judge greedy completions; loss: "
                                           "NLL of the harmful responses")
    alphas: list[float] = Field(default_factory=lambda: [round(-1 + 0.2 * i, 10) for i in range(11)])
    threshold: float | None = Field(None, description="basin edge; default: the value at a = 0 "
                                    "plus (hrr) or minus (loss) tolerance")
    tolerance: float = Field(0.1, ge=0)
    safe: Literal["auto", "below", "above"] = Field("auto", description="which side of the threshold "
                                                    "is safe; auto: below for hrr, above for loss")
    params: list[str] | None = Field(None, description="parameters of the random directions")
    random_directions: int = Field(0, ge=0, description="add this many random directions (seeds seed, seed+1, ...)")
    seed: int = 0
    judge: JudgeArgs = Field(default_factory=JudgeArgs)
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(8, ge=1)
    max_length: int = Field(512, ge=8)
    system_prompt: str | None = None

    @field_validator("alphas")
    @classmethod
    def _with_zero(cls, v: list[float]) -> list[float]:
        # a = 0 (the model itself) anchors the basin and the default threshold.
        return sorted(set(float(a) for a in v) | {0.0})

    def safe_side(self) -> str:
        return self.safe if self.safe != "auto" else ("below" if self.metric == "hrr" else "above")



def basin_width(alphas, values, threshold: float, *, safe: Literal["below", "above"] = "below") -> dict:
    """The contiguous run of safe points around a = 0 (safe: value at or under the threshold, or
    at or over it with safe='above'). width = the largest |a| in that run (0 when a = 0 itself
    is unsafe); left / right: its ends. None values (nothing rated) end the run."""
    pairs = sorted(zip((float(a) for a in alphas), values))
    xs = [a for a, _ in pairs]
    if 0.0 not in xs:
        raise ValueError("basin_width needs a = 0 among the alphas")

    def ok(v) -> bool:
        return v is not None and not math.isnan(v) and (v <= threshold if safe == "below" else v >= threshold)

    c = xs.index(0.0)
    if not ok(pairs[c][1]):
        return {"width": 0.0, "left": 0.0, "right": 0.0, "center_safe": False}
    lo = c
    while lo > 0 and ok(pairs[lo - 1][1]):
        lo -= 1
    hi = c
    while hi < len(xs) - 1 and ok(pairs[hi + 1][1]):
        hi += 1
    return {"width": max(abs(xs[lo]), abs(xs[hi])), "left": xs[lo], "right": xs[hi], "center_safe": True}


def safety_landscape(model, tokenizer, directions: Mapping[str, Mapping[str, torch.Tensor]],
                     args: SafetyLandscapeArgs, out_dir=None, *, judge: Judge | None = None,
                     conversations: list[Conversation] | None = None) -> dict:
    """HRR (or harmful-response loss) along theta + a d for each named direction, with its basin
    width. args.random_directions random directions over args.params are added as random0, ....
    Returns alphas, metric, threshold, safe, curves {name: [value per alpha]}, unparsed {name:
    [count per alpha]} (hrr), degenerate {name: [share per alpha]} (hrr: empty or looping
    answers, counted apart from HRR), basin {name: basin_width(...)}, files; with out_dir rank 0
    writes safety_landscape.csv (direction,alpha,value,unparsed,degenerate) and safety_landscape.png."""
    dirs = {name: dict(d) for name, d in directions.items()}
    if args.random_directions:
        params = select_parameters(model, args.params)
        for k in range(args.random_directions):
            dirs[f"random{k}"] = random_direction(params, args.seed + k)
    if not dirs:
        raise ValueError("safety_landscape needs at least one direction")
    for name, d in dirs.items():
        check_shapes(model, d, f"direction {name!r}")
    if args.metric == "hrr":
        convs = conversations if conversations is not None else load_prompts(args.harmful, args.system_prompt)
        judge = judge or make_judge(args.judge)
    else:
        convs = conversations if conversations is not None else load_conversations(args.harmful, args.system_prompt)

    def measure() -> tuple[float | None, int, float | None]:
        """(value, unparsed verdicts, degenerate share: hrr is the compliance share and the
        empty or looping answers are their own line, breakdown.py)."""
        if args.metric == "loss":
            return mean_nll(example_nll(model, tokenizer, convs, max_length=args.max_length,
                                        batch_size=args.batch_size, progress=False)), 0, None
        gens = generate(model, tokenizer, convs, max_new_tokens=args.max_new_tokens,
                        batch_size=args.batch_size, progress=False)
        stats = summarize(judge_generations(judge, gens, args.judge.batch_size), [g.response for g in gens])
        return stats["hrr"], stats["unparsed"], stats["degenerate_rate"]

    curves, unparsed, degenerate = {}, {}, {}
    center = None
    for name, d in dirs.items():
        curves[name], unparsed[name], degenerate[name] = [], [], []
        with perturbed(model, sorted(d)) as set_point:
            for a in track(list(args.alphas), f"safety landscape ({name})", disable=not is_main()):
                if a == 0.0 and center is not None:
                    point = center  # theta itself: the same for every direction
                else:
                    set_point([(a, d)])
                    point = measure()
                    if a == 0.0:
                        center = point
                curves[name].append(point[0])
                unparsed[name].append(point[1])
                degenerate[name].append(point[2])
    center_value = center[0] if center is not None else None
    safe = args.safe_side()
    threshold = args.threshold
    if threshold is None:
        if center_value is None:
            raise ValueError("no value at a = 0 to set the threshold from; set threshold")
        threshold = center_value + args.tolerance if safe == "below" else center_value - args.tolerance
    basin = {name: basin_width(args.alphas, curves[name], threshold, safe=safe) for name in dirs}
    result = {"alphas": list(args.alphas), "metric": args.metric, "threshold": threshold, "safe": safe,
              "curves": curves, "unparsed": unparsed, "degenerate": degenerate, "basin": basin,
              "center": center_value,
              "judge": judge.name if judge is not None else None, "files": {}}
    if out_dir is not None:
        out = Path(out_dir)
        result["files"] = {"csv": str(out / "safety_landscape.csv"), "png": str(out / "safety_landscape.png")}
        if is_main():
            _write_safety(result, out)
    return result


def _write_safety(result: dict, out: Path) -> None:
    from safebasin.safety_core.measure import plots
    out.mkdir(parents=True, exist_ok=True)
    with open(result["files"]["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["direction", "alpha", "value", "unparsed", "degenerate"])
        for name, values in result["curves"].items():
            for a, v, u, g in zip(result["alphas"], values, result["unparsed"][name], result["degenerate"][name]):
                w.writerow([name, a, "" if v is None else repr(float(v)), u, "" if g is None else repr(float(g))])
    label = "HRR" if result["metric"] == "hrr" else "harmful-response loss"
    plots.line_plot(result["files"]["png"], result["alphas"], result["curves"], xlabel="a",
                    ylabel=label, title=f"safety landscape ({label})",
                    hlines={f"threshold {result['threshold']:.3g}": result["threshold"]})
