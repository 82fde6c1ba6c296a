"""The study file's schema: what a study declares (models, data, stages, evaluation suites,
checks, plots) and how a file becomes one validated `Study` (presets merged, dotted overrides
applied, unknown keys named with the keys allowed there). The meaning of references between
its parts is checked by plan.py. May import safety_core.args and the study's faults module only.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator
from safebasin.safety_core.args import Section
from safebasin.safety_core.study.faults import describe

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Commands a stage may run. model: a model as it is (nothing runs; it can be evaluated).
COMMANDS = ("model", "train", "restore", "eval", "landscape", "align-basis", "safe-lora-project")


def identifiers(value: dict, what: str, read_as: str) -> dict:
    """`value` when its keys are identifiers: expressions read them as dotted names."""
    bad = [k for k in value if not NAME.match(str(k))]
    if bad:
        raise ValueError(f"{what} {bad} are not identifiers (letters, digits, _): expressions read them as {read_as}")
    return value


class StudyError(ValueError):
    """A study that cannot run; `problems` holds one line per fault."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid study:\n" + "\n".join(f"  - {p}" for p in problems))


class Builder(Section):
    """A named builder of the package (builders.py) and its arguments; it writes named files."""
    builder: str
    args: dict[str, Any] = Field(default_factory=dict)


class Pool(Section):
    """A data source read once, de-duplicated, shuffled with `seed` and cut into disjoint splits
    (in order), each written as DATA/<split>.jsonl."""
    source: dict[str, Any] = Field(description="a data source as in a job config: path (file, builtin:NAME "
                                   "or hub dataset id), split, subset, filter, limit, ...")
    splits: dict[str, int] = Field(description="split name -> records, taken in this order")
    seed: int | str = Field("${seed}", description="shuffle seed (default: the study seed)")
    shuffle: bool = True


class DataSpec(Section):
    builders: dict[str, Builder] = Field(default_factory=dict)
    pools: dict[str, Pool] = Field(default_factory=dict)


class Stage(Section):
    command: Literal["model", "train", "restore", "eval", "landscape", "align-basis", "safe-lora-project"]
    config: dict[str, Any] = Field(default_factory=dict, description="the command's job config (model: "
                                   "{path}; align-basis and safe-lora-project: their options by name)")
    title: str | None = Field(None, description="the stage's row label in the table")


class Suite(Section):
    """An evaluation suite: one eval job section applied to each of `stages`."""
    stages: list[str]
    eval: dict[str, Any] = Field(description="the eval section of an eval job config")
    model: dict[str, Any] = Field(default_factory=dict, description="model keys besides path/adapter "
                                  "(dtype, attn_implementation, ...)")
    job: dict[str, Any] = Field(default_factory=dict, description="other sections of the eval job "
                                "(deepspeed, runtime)")
    metrics: dict[str, str] | None = Field(None, description="name -> standard number (metrics.py); "
                                           "default: every standard number the suite measures")


class Plot(Section):
    kind: Literal["bars", "training"]
    file: str = Field(description="PNG file name under plots/")
    stages: list[str] | None = Field(None, description="default: every evaluated stage")
    metrics: list[str] = Field(default_factory=list, description="bars: the metrics drawn per stage")
    metric: str = Field("probe_hrr", description="training: the metrics.jsonl column drawn over steps")
    title: str = ""
    ylabel: str = ""


class SweepPlot(Section):
    """HRR against task accuracy (say): one curve per value of `curve`, each point labelled with
    its `label` value (grid keys)."""
    x: str = "task_accuracy"
    y: str = "hrr"
    curve: str
    label: str
    title: str = ""
    xlabel: str = ""
    ylabel: str = ""


class Matched(Section):
    """Pairs of points of two curves whose `near` values lie within `within`, with their gap in
    `compare`: a comparison at matched task accuracy (the AsFT paper's question)."""
    key: str = Field(description="the grid key whose values name the curves")
    method: str
    control: str
    also: list[str] = Field(default_factory=list, description="other curves compared with the control "
                            "the same way (the controls of the method)")
    by: str = Field(description="the grid key that tells a curve's points apart (e.g. lam)")
    near: str = Field("task_accuracy", description="the metric whose values must lie within `within`")
    within: float = Field(0.02, ge=0)
    compare: str = "hrr"


class Sweep(Section):
    """A stage run again at every point of a grid (e.g. the attack for each anchor variant and
    lambda): each point is a stage of its own (resumed point by point), measured by `evals`;
    its rows go to plots/FILE.csv and plots/FILE.png, per seed and as means over seeds."""
    enabled: bool = Field(True, description="false: declared and checked, not run (turn on with "
                          "sweeps.NAME.enabled=true)")
    stage: str = Field(description="the stage whose config each point copies")
    grid: dict[str, list[Any]] = Field(description="key -> values; every combination, in this order; a "
                                       "point's config reads its values as ${sweep.KEY}")
    config: dict[str, Any] = Field(default_factory=dict, description="merged over the stage's config at "
                                   "each point")
    evals: list[str] = Field(min_length=1, description="the suites that measure each point")
    metrics: list[str] | None = Field(None, description="the CSV's metric columns (default: every one)")
    columns: dict[str, str] = Field(default_factory=dict, description="grid key -> its column name in the "
                                    "CSV and results (a grid key cannot be a Python keyword such as lambda)")
    file: str | None = Field(None, description="plots/FILE.csv and plots/FILE.png (default: the sweep's name)")
    plot: SweepPlot | None = None
    matched: Matched | None = None

    @field_validator("grid")
    @classmethod
    def _grid(cls, value: dict) -> dict:
        identifiers(value, "grid keys", "${sweep.KEY}")
        empty = [k for k, v in value.items() if not v]
        if empty or not value:
            raise ValueError(f"every grid key needs at least one value; empty: {empty or '(no keys)'}")
        return value


class Verdict(Section):
    """A plain sentence about the result (report.py's VERDICTS). anchor: does the anchored stage
    (`method`) beat plain L2 shrinkage (`control`) at matched task accuracy (`within`)?"""
    kind: Literal["anchor"]
    method: str = "asft"
    control: str = "l2"
    also: list[str] = Field(default_factory=list, description="stages whose numbers the sentence also gives")
    within: float = Field(0.02, ge=0)


class TrackingSpec(Section):
    experiment: str = "safebasin-study"


class Study(Section):
    name: str
    description: str = ""
    seed: int = 0
    threads: int = Field(1, ge=1, description="torch threads of the process that runs the stages")
    vars: dict[str, Any] = Field(default_factory=dict, description="named values, read as ${vars.KEY}")
    presets: dict[str, dict[str, Any]] = Field(default_factory=dict, description="--preset NAME merges "
                                               "this mapping over the study")
    defaults: dict[str, Any] = Field(default_factory=dict, description="job sections under every train, "
                                     "restore and eval job (a stage's own keys win)")
    models: dict[str, str | Builder] = Field(default_factory=dict)
    data: DataSpec = Field(default_factory=DataSpec)
    stages: dict[str, Stage]
    evals: dict[str, Suite] = Field(default_factory=dict)
    checks: dict[str, str] = Field(default_factory=dict, description="name -> rule over stage metrics, "
                                   "e.g. 'hrr(lora) - hrr(aligned) >= 0.2', judged on the means over seeds")
    plots: list[Plot] = Field(default_factory=list)
    sweeps: dict[str, Sweep] = Field(default_factory=dict)
    verdicts: dict[str, Verdict] = Field(default_factory=dict)
    caption: str = Field("", description="printed under the table; ${...} reads seed and vars")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)

    @field_validator("stages", "models", "evals", "sweeps")
    @classmethod
    def _identifiers(cls, value: dict) -> dict:
        return identifiers(value, "names", "${stages.NAME.model}")

    @model_validator(mode="after")
    def _data_names(self):
        bad = [n for n in self.data_names() if not NAME.match(n)]
        if bad:
            raise ValueError(f"data names {bad} are not identifiers (letters, digits, _)")
        return self

    def data_names(self) -> list[str]:
        """Every data file name the pools declare (builders' names come from builders.py)."""
        return [split for pool in self.data.pools.values() for split in pool.splits]


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def set_dotted(raw: dict, text: str) -> None:
    """Apply one `dotted.key=value` override (the value read as YAML)."""
    if "=" not in text:
        raise StudyError([f"override {text!r} must look like dotted.key=value"])
    key, value = text.split("=", 1)
    parts = key.split(".")
    if not all(parts):
        raise StudyError([f"override {text!r}: empty key part"])
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise StudyError([f"override {text!r}: {part!r} is a value, not a section"])
        node = child
    node[parts[-1]] = yaml.safe_load(value) if value != "" else ""


def read(path: str | Path, overrides: list[str] = (), preset: str | None = None) -> tuple[Study, dict]:
    """The validated study of a file (with --preset and dotted overrides), and its raw mapping."""
    path = Path(path)
    if not path.is_file():
        raise StudyError([f"{path}: no such study file"])
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise StudyError([f"{path}: not valid YAML ({e})"]) from None
    if not isinstance(raw, dict):
        raise StudyError([f"{path}: a study is a mapping of sections, got {type(raw).__name__}"])
    if preset is not None:
        presets = raw.get("presets") or {}
        if preset not in presets:
            raise StudyError([f"--preset {preset}: {path} has no such preset; it has: {sorted(presets)}"])
        raw = merge(raw, presets[preset])
    problems = [p for p in (undeclared_var(raw, text) for text in overrides) if p]
    if problems:
        raise StudyError(problems)
    for text in overrides:
        set_dotted(raw, text)
    return validate(raw), raw


def undeclared_var(raw: dict, text: str) -> str | None:
    """Why an override of `vars.KEY...` names no var the study declares (a misspelt knob would
    otherwise be a new var that nothing reads); None when it does, or is no vars override."""
    key = text.split("=", 1)[0]
    parts = key.split(".")
    if parts[0] != "vars" or len(parts) < 2:
        return None
    node = raw.get("vars") or {}
    for i, part in enumerate(parts[1:], 1):
        if not isinstance(node, dict) or part not in node:
            where = ".".join(parts[:i])
            have = sorted(node) if isinstance(node, dict) else f"a value ({node!r})"
            close = difflib.get_close_matches(part, list(node) if isinstance(node, dict) else [], n=1)
            return (f"override {key}: the study declares no var {where}.{part}; {where} has: {have}"
                    + (f"; did you mean {close[0]!r}?" if close else ""))
        node = node[part]
    return None


def validate(raw: dict) -> Study:
    try:
        return Study.model_validate(raw)
    except ValidationError as err:
        raise StudyError(describe(err, Study)) from None
