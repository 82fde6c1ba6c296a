"""The stages that run in the study's own process, no job launched: `model` (a model as it is),
`align-basis` and `safe-lora-project` (the options of the commands of those names). Their
configs are validated here, with the same unknown-key rule as every other section.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError
from safebasin.safety_core.args import Section
from safebasin.safety_core.study.faults import describe


class ModelStage(Section):
    path: str = Field(description="local folder, hub id, or builtin:NAME")


class AlignBasisStage(Section):
    aligned: str
    base: str
    modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    variant: str = "safelora"
    rank: int | Literal["full"] | None = Field(None, description="directions kept per layer; full: rank(V)")
    tol: float | None = None
    device: str | None = None


class SafeLoraStage(Section):
    adapter: str
    basis: str
    threshold: float | None = None
    num_layers: int | None = None


SCHEMAS = {"model": ModelStage, "align-basis": AlignBasisStage, "safe-lora-project": SafeLoraStage}


def problems(command: str, config: dict, where: str) -> list[str]:
    try:
        SCHEMAS[command].model_validate(config)
    except ValidationError as err:
        return [f"{where}.{p}" for p in describe(err, SCHEMAS[command])]
    return []


def run(command: str, config: dict, folder: Path) -> None:
    """Make a local stage's outputs in `folder` (a model stage makes none)."""
    args = SCHEMAS[command].model_validate(config)
    if command == "align-basis":
        from safebasin.safety_core.anchor.basis import extract_basis
        from safebasin.safety_core.train.tiny import resolve_builtin_model
        extract_basis(resolve_builtin_model(args.aligned), resolve_builtin_model(args.base), folder,
                      modules=list(args.modules), variant=args.variant, rank=args.rank, tol=args.tol,
                      device=args.device)
    elif command == "safe-lora-project":
        from safebasin.safety_core.anchor.safe_lora import project_adapter
        project_adapter(args.adapter, args.basis, folder / "adapter", threshold=args.threshold,
                        num_layers=args.num_layers)
