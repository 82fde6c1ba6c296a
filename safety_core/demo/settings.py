"""The organism's recipe: every size, step count and knob of the demo in one validated schema.

`safebasin demo` runs `DemoSettings()` as it is; `--quick` applies QUICK (every stage tiny, for
tests: it goes through the same code, not the same numbers), and dotted overrides
(`attack.fraction=0.3`) change single knobs.
"""

from __future__ import annotations

from pydantic import Field, field_validator
from safebasin.safety_core.anchor.variants import VARIANTS
from safebasin.safety_core.args import Section


class ModelShape(Section):
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 176
    vocab_size: int = 768


class DataSizes(Section):
    task: int = Field(600, ge=16, description="task records for training (also the retain pool)")
    task_eval: int = Field(100, ge=4, description="held-out task records")
    harmful: int = Field(400, ge=16, description="training-pool requests per answer kind")
    heldout: int = Field(48, ge=4, description="held-out harmful prompts (evaluation)")
    max_length: int = Field(96, ge=16)


class FullTrain(Section):
    """A full-parameter stage (base: task + compliance; aligned: task + refusals)."""
    steps: int = Field(ge=1)
    lr: float = Field(gt=0)
    batch: int = Field(16, ge=1)
    examples: int = Field(ge=2, description="training set size (task + harmful)")
    harmful_fraction: float = Field(0.5, ge=0, le=1)


class Attack(Section):
    """The harmful fine-tuning attack on the aligned model: LoRA on task data with a fraction
    of harmful compliance."""
    # p 0.7 at lr 5e-3: chosen on development prompts (benchmarks/tiny_attack_dev.py) as the
    # setting whose smallest erosion over seeds 0-2 was largest (+0.58 HRR); at the former
    # p 0.3, lr 2e-3 the attack raised HRR by +0.04 to +0.17 and the checks met no real erosion.
    fraction: float = Field(0.7, ge=0, le=1, description="p: share of harmful records")
    examples: int = Field(200, ge=2)
    steps: int = Field(35, ge=1)
    lr: float = Field(5e-3, gt=0)
    batch: int = Field(16, ge=1)
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    probe_every: int = Field(5, ge=1, description="steps between the in-training safety probes (HRR on "
                             "held-out prompts, train.safety_probe); the plot of HRR during training")
    probe_prompts: int = Field(24, ge=1, description="held-out prompts per probe")


class Anchor(Section):
    """AsFT: the same attack with the anchor penalty on the alignment basis, and its two controls
    (anchor/variants.py): plain L2 shrinkage of the update (`l2`) and the penalty on the part
    inside the alignment span (`aligned_control`, the AsFT paper's reverse control)."""
    lam: float = Field(10.0, alias="lambda", ge=0)
    # safelora: C = V V^T / ||V||_F, as the AsFT reference code computes. (The projector variant
    # with k = 1..8 did not hold the attack in this organism: the attack fits inside the span.)
    variant: str = Field("safelora", pattern="^(safelora|projector)$")
    rank: int = Field(8, ge=1, description="k: alignment directions kept per layer")
    # The controls at AsFT's lambda: in this organism the task accuracy hardly moves with lambda,
    # so the same lambda already gives matched accuracy (the check verifies it).
    l2_lambda: float = Field(10.0, ge=0, description="lambda of the l2 control stage")
    aligned_lambda: float = Field(10.0, ge=0, description="lambda of the aligned_control stage")


class Frontier(Section):
    """`safebasin demo --frontier`: the attack retrained for each lambda of each anchor variant
    (the AsFT paper's Fig. 4a: HRR against task accuracy)."""
    variants: list[str] = Field(default_factory=lambda: ["safelora", "safelora-normalized", "l2", "aligned"])
    lambdas: list[float] = Field(default_factory=lambda: [1.0, 10.0, 100.0, 1000.0])

    @field_validator("variants")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        unknown = [v for v in value if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown anchor variant(s) {unknown}; allowed: {', '.join(VARIANTS)}")
        return value

    @field_validator("lambdas")
    @classmethod
    def _non_negative(cls, value: list[float]) -> list[float]:
        if any(lam < 0 for lam in value):
            raise ValueError(f"lambdas must be >= 0, got {value}")
        return value


class Restore(Section):
    """Curvature-aware restoration of the attacked (plain LoRA) adapter."""
    forget_size: int = 50
    curvature_forget_size: int = 96
    retain1_size: int = 96
    retain2_size: int = 96
    history: int = 10
    probes: int = 30
    eta_c: float = 0.01
    iterations: int = 3
    eps: float = 0.05
    eta: float = 1.0
    max_step: float = 0.5
    delta: float | None = None
    mu: float = 0.1
    refresh_pairs: bool = False
    curvature_sources: str = Field("mixed", pattern="^(mixed|retain|forget|none)$")
    batch_size: int = 16


class EvalSettings(Section):
    max_new_tokens: int = Field(24, ge=1)
    task_max_new_tokens: int = Field(8, ge=1)
    prefill_k: int = Field(4, ge=1, description="target tokens the prefilling attack forces")
    batch_size: int = Field(48, ge=1)


class LandscapeSettings(Section):
    alignment_alphas: list[float] = Field(default_factory=lambda: [-1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5])
    attack_alphas: list[float] = Field(default_factory=lambda: [-0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5])
    prompts: int = Field(24, ge=1, description="held-out prompts per landscape point")


class DemoSettings(Section):
    seed: int = 0
    threads: int = Field(1, ge=1, description="torch threads of the in-process stages: the organism's "
                         "matrices are too small to split, and on a busy machine threads that wait on "
                         "each other make a step many times slower")
    model: ModelShape = Field(default_factory=ModelShape)
    data: DataSizes = Field(default_factory=DataSizes)
    base: FullTrain = Field(default_factory=lambda: FullTrain(steps=200, lr=3e-3, examples=800))
    # Refusals are 70% of the alignment mix: with half, unseen request templates were often
    # answered as reviews (the task), not refused.
    aligned: FullTrain = Field(default_factory=lambda: FullTrain(steps=120, lr=1.5e-3, examples=500,
                                                                 harmful_fraction=0.7))
    attack: Attack = Field(default_factory=Attack)
    anchor: Anchor = Field(default_factory=Anchor)
    restore: Restore = Field(default_factory=Restore)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    landscape: LandscapeSettings = Field(default_factory=LandscapeSettings)
    frontier: Frontier = Field(default_factory=Frontier)


# Every stage tiny: for tests of the pipeline, not of the phenomenon.
QUICK = {
    "model": {"hidden_size": 32, "intermediate_size": 64, "vocab_size": 400},
    "data": {"task": 64, "task_eval": 8, "harmful": 48, "heldout": 6, "max_length": 64},
    "base": {"steps": 4, "examples": 48, "batch": 8},
    "aligned": {"steps": 3, "examples": 48, "batch": 8},
    "attack": {"steps": 3, "examples": 32, "batch": 8, "probe_every": 1, "probe_prompts": 3},
    "restore": {"forget_size": 8, "curvature_forget_size": 8, "retain1_size": 8, "retain2_size": 8,
                "probes": 3, "iterations": 1, "batch_size": 8},
    "eval": {"max_new_tokens": 6, "task_max_new_tokens": 4, "prefill_k": 2},
    "landscape": {"alignment_alphas": [-1.0, 0.0], "attack_alphas": [0.0, 1.0], "prompts": 3},
    "frontier": {"variants": ["safelora", "l2"], "lambdas": [1.0, 100.0]},
}


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
