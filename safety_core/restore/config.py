"""The `restore:` config section (DESIGN.md, "Restoration"). Defaults are the paper's except
`mu` (the paper regularises but gives no value: safebasin's choice) and `max_step` / `eta` /
`delta` (safebasin's; docs/restore.md's table marks which is which). The step length is not a setting:
it is the one the budget eps allows under the quadratic model (policy.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from safebasin.safety_core.args import Section
from safebasin.safety_core.train.data import DataSource


class RestoreArgs(Section):
    forget: DataSource = Field(description="D_forget: harmful prompts with harmful responses; "
                               "the loss is the NLL of the response")
    curvature_forget: DataSource | None = Field(
        None, description="D_curv_forget for the curvature pairs; default (or the same source as "
        "forget): split from `forget`, disjoint from D_forget")
    retain: DataSource = Field(description="task data, split into disjoint D_retain1 and D_retain2")
    forget_size: int = Field(50, ge=1, description="|D_forget|")
    curvature_forget_size: int = Field(256, ge=1, description="|D_curv_forget|")
    retain1_size: int = Field(256, ge=1, description="|D_retain1|")
    retain2_size: int = Field(256, ge=1, description="|D_retain2|")
    history: int = Field(10, ge=1, description="m: newest curvature pairs kept")
    history_dtype: Literal["fp32", "bf16"] = Field(
        "fp32", description="storage of the curvature pairs (dots and directions are fp32 either way); "
        "bf16 halves the 2 m P_local values per rank")
    history_device: Literal["parameters", "cpu"] = Field(
        "parameters", description="where the curvature pairs live: the parameters' device, or the "
        "CPU (host memory; each direction then streams the history over the host)")
    pair_threshold: float = Field(1e-6, description="a pair is kept iff the reduced <s, y> exceeds this")
    probes: int = Field(30, ge=1, description="probe batches per pair collection, cycling "
                        "the sets curvature_sources names")
    curvature_sources: Literal["mixed", "retain", "forget", "none"] = Field(
        "mixed", description="where the curvature pairs come from: mixed (the paper's) cycles "
        "D_curv_forget, D_retain1, D_retain2; retain only D_retain1, D_retain2; forget only D_curv_forget; "
        "none collects no pair: the first-order control (the direction is the forget gradient, its "
        "curvature measured along each accepted step)")
    eta_c: float = Field(1e-2, gt=0, description="probe step: s = -eta_c * batch gradient")
    iterations: int = Field(3, ge=1)
    eps: float = Field(0.1, gt=0, description="retain budget: accept iff L_retain <= L_retain(theta_ft) + eps; "
                       "the steps are sized to use it")
    # The paper iterates "with L2 regularization" but states no strength. 0.1 (safebasin's
    # choice): on the demo organism the pull back is then 1-7% of the forget gradient after
    # moves of 0.2-1.0 (1.0 made it 15-70%, a second objective): benchmarks/RESULTS.md.
    mu: float = Field(0.1, ge=0, description="L2 pull back to theta_ft in the direction")
    eta: float = Field(1.0, gt=0, description="share of the budget-sized step taken first: t = eta * t*, "
                       "t* the length at which the predicted retain change uses the budget left")
    max_step: float = Field(0.5, gt=0, description="initial trust radius: the largest step norm relative "
                            "to the norm of the trainable parameters (||p|| <= max_step ||theta||)")
    delta: float | None = Field(None, gt=0, description="an absolute cap on the first step's L2 norm, in "
                                "parameter units (before the budget rule it was the initial radius; its "
                                "meaning changes with the model: prefer max_step)")
    max_retries: int = Field(5, ge=0, description="backtracking tries after a rejected step, per iteration "
                             "(each at most half the last)")
    refresh_pairs: bool = Field(False, description="re-collect the pairs at the current parameters "
                                "before every iteration after the first")
    batch_size: int = Field(8, ge=1, description="examples per global batch (split over ranks)")
    max_length: int = Field(512, ge=8)
    max_dropped_share: float = Field(0.1, ge=0, le=1, description="largest share of a set's examples whose "
                                     "response max_length may truncate away entirely (they are dropped and "
                                     "counted); more is refused")
    system_prompt: str | None = None
    seed: int = 0
