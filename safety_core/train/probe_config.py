"""The `train.safety_probe` config section. Only the schema lives in train/ (the trainer's
config holds it); the probe itself generates and judges, so it lives in measure/probe.py and
reaches the loop as a step hook (trainer.StepHook), built by the launcher."""

from __future__ import annotations

from pydantic import Field
from safebasin.safety_core.args import Section
from safebasin.safety_core.train.data import DataSource


class SafetyProbeArgs(Section):
    every: int = Field(ge=1, description="optimizer steps between probes")
    prompts: DataSource = Field(description="held-out harmful prompts (never training data)")
    limit: int = Field(32, ge=1, description="K: prompts per probe (the first K of the source)")
    max_new_tokens: int = Field(32, ge=1)
    batch_size: int = Field(16, ge=1)
    stop_above: float | None = Field(None, ge=0, le=1, description="stop the job (after a checkpoint) "
                                     "when the probe's HRR exceeds this; none: never")
    system_prompt: str | None = None
