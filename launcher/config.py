"""The job config: YAML plus dotted command-line overrides, validated before any work starts.

Each section's fields are defined next to the code that uses them (safety_core); this module
composes them into one schema and turns validation failures into messages that name the key,
the allowed values and the closest valid key.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator
from safebasin.safety_core.anchor.regularizer import AnchorArgs
from safebasin.safety_core.args import Section, section_type
from safebasin.safety_core.measure.evaluation import EvalArgs
from safebasin.safety_core.measure.landscape_job import LandscapeJobArgs
from safebasin.safety_core.restore.config import RestoreArgs
from safebasin.safety_core.runtime import RuntimeArgs
from safebasin.safety_core.train.data import DataArgs
from safebasin.safety_core.train.ds_config import DeepSpeedArgs
from safebasin.safety_core.train.modeling import MethodArgs, ModelArgs
from safebasin.safety_core.train.trainer import TrainArgs


class TrackingArgs(Section):
    enabled: bool = True
    experiment: str = "safebasin"
    run_name: str | None = None
    uri: str | None = Field(None, description="MLflow tracking URI; MLFLOW_TRACKING_URI wins, "
                            "default: a SQLite store ./mlflow.db")

    def resolved_uri(self) -> str:
        return (os.environ.get("MLFLOW_TRACKING_URI") or self.uri
                or f"sqlite:///{Path('mlflow.db').resolve()}")


class OutputArgs(Section):
    dir: str = "runs/latest"


class JobConfig(Section):
    model: ModelArgs
    method: MethodArgs = Field(default_factory=MethodArgs)
    data: DataArgs | None = None
    train: TrainArgs | None = None
    deepspeed: DeepSpeedArgs = Field(default_factory=lambda: DeepSpeedArgs(stage=0))
    tracking: TrackingArgs = Field(default_factory=TrackingArgs)
    output: OutputArgs = Field(default_factory=OutputArgs)
    runtime: RuntimeArgs = Field(default_factory=RuntimeArgs)
    eval: EvalArgs | None = None
    landscape: LandscapeJobArgs | None = None
    anchor: AnchorArgs | None = None
    restore: RestoreArgs | None = None

    @model_validator(mode="after")
    def _one_precision(self):
        """model.dtype (what the weights are loaded in) and train.precision (what DeepSpeed
        trains in) name one choice: given one, the other follows; given both, they must agree."""
        if self.train is None:
            return self
        from safebasin.safety_core.precision import PRECISION
        dtype_given = "dtype" in self.model.model_fields_set
        precision_given = "precision" in self.train.model_fields_set
        if dtype_given and precision_given and PRECISION[self.model.dtype] != self.train.precision:
            follows = {v: k for k, v in PRECISION.items()}
            raise ValueError(f"model.dtype {self.model.dtype!r} and train.precision {self.train.precision!r} "
                             f"disagree: model.dtype {self.model.dtype!r} trains in train.precision "
                             f"{PRECISION[self.model.dtype]!r}, train.precision {self.train.precision!r} "
                             f"needs model.dtype {follows[self.train.precision]!r}; set one of them")
        if dtype_given and not precision_given:
            self.train.precision = PRECISION[self.model.dtype]
        elif precision_given and not dtype_given:
            self.model.dtype = {v: k for k, v in PRECISION.items()}[self.train.precision]
        return self

    def require(self, *sections: str) -> None:
        missing = [s for s in sections if getattr(self, s) is None]
        if missing:
            raise ConfigError([f"{s}: this command needs a '{s}:' section" for s in missing])


class ConfigError(ValueError):
    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError([f"override {text!r} must look like dotted.key=value"])
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError([f"override {text!r}: empty key part"])
    return key.split("."), yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise ConfigError([f"override {text!r}: {k!r} is a value, not a section"])
            node = child
        node[keys[-1]] = value
    return raw


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that owns the location's last key, for did-you-mean."""
    current = model
    for part in loc[:-1]:
        if isinstance(part, int) or current is None:
            continue
        field = current.model_fields.get(part)
        if field is None:
            return None
        current = section_type(field.annotation)
    return current


def describe(err: ValidationError, schema: type[BaseModel] = None) -> list[str]:
    schema = schema or JobConfig
    problems = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"]
                    if not (isinstance(p, str) and p.startswith(("function-", "literal[", "tagged-union["))))
        key = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            owner = _model_at(schema, loc)
            # YAML keys are the aliases where a field has one (anchor.lambda, not anchor.lam).
            allowed = sorted(f.alias or n for n, f in owner.model_fields.items()) if owner else []
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f"; did you mean {'.'.join(map(str, loc[:-1] + (close[0],)))!r}?" if close else ""
            problems.append(f"{key}: unknown key; allowed here: {allowed}{hint}")
        elif e["type"] == "missing":
            problems.append(f"{key}: required")
        else:
            problems.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
    return problems


def build(raw: dict, schema: type[BaseModel] = None) -> JobConfig:
    schema = schema or JobConfig
    if not isinstance(raw, dict):
        raise ConfigError([f"the config must be a mapping of sections, got {type(raw).__name__}"])
    try:
        return schema.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(describe(err, schema)) from None


def load_config(path: str | Path, overrides: list[str] = ()) -> JobConfig:
    path = Path(path)
    if not path.exists():
        raise ConfigError([f"{path}: no such config file"])
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: not valid YAML ({e})"]) from None
    return build(apply_overrides(raw, list(overrides)))


def dump(config: JobConfig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written aside and renamed: with a shared output.dir every node of a per-node launch writes
    # this file while the ranks of other nodes may already be reading it.
    tmp = path.with_name(f".{path.name}.{os.uname().nodename}.{os.getpid()}.tmp")
    tmp.write_text(yaml.safe_dump(config.model_dump(mode="json", by_alias=True), sort_keys=False))
    os.replace(tmp, path)
    return path


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out
