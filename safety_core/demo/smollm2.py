"""The real-model organism (`safebasin demo --organism smollm2`): SmolLM2-135M-Instruct, public
safety data, every stage an ordinary job config, and its settings in one validated schema.

Stages: base (the model as shipped) -> aligned (safety alignment of base) -> basis (aligned -
base) -> lora (the harmful fine-tuning attack) / asft (the attack with the anchor) / l2 (its
control: the same penalty weight on the whole update, no direction) / safe-lora (the plain
adapter projected) / restored (restoration of the plain adapter) / restored_first_order (its
control: the same budget rule with no curvature pairs) / lora_benign (the CASR paper's main
setting: LoRA on benign Dolly instructions only) / restored_benign (its restoration).
`stages` picks a subset (a stage's inputs must be in it or finished before).

Alignment is full-parameter training of `aligned_modules` (`method.trainable`), written as a
whole model folder, on benign instructions mixed with refusals and safety recovery records (a
harmful start, then a refusal), so that the refusal holds after a prefilled harmful start. Why
not LoRA merged: the update would be rank r by construction rather than by what the data asks
for. Which modules it trains was chosen on the development prompts (docs/results.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, field_validator
from safebasin.safety_core.args import Section
from safebasin.safety_core.demo.smollm2_data import LABELS

MODEL = "builtin:smollm2-135m-instruct"
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STAGES = ("base", "aligned", "lora", "asft", "l2", "safe-lora", "restored", "restored_first_order",
          "lora_benign", "restored_benign")
# What each stage's job reads from earlier stages (the basis comes with aligned).
NEEDS = {"aligned": ("base",), "lora": ("aligned",), "asft": ("aligned",), "l2": ("aligned",),
         "safe-lora": ("lora",), "restored": ("lora",), "restored_first_order": ("lora",),
         "lora_benign": ("aligned",), "restored_benign": ("lora_benign",)}
# restoration stage -> (the adapter it restores, the data file its retain set comes from)
RESTORES = {"restored": ("lora", "task"), "restored_first_order": ("lora", "task"),
            "restored_benign": ("lora_benign", "benign_task")}


class Smollm2Data(Section):
    dir: str = Field("../shared/data", description="the shared data folder (SOURCES.md, safety/, ...)")
    safety: int = Field(400, ge=8, description="safety_tuned_llamas records for alignment")
    deep: int = Field(200, ge=0, description="safety recovery records for alignment (a harmful start given "
                      "as context, then a refusal), from compliance records no other file holds; 0: none")
    benign: int = Field(400, ge=8, description="Alpaca records mixed into alignment")
    benign_heldout: int = Field(50, ge=4, description="held-out Alpaca prompts for over-refusal")
    task: int = Field(600, ge=8, description="SST-2 train records for the attack")
    task_eval: int = Field(200, ge=4, description="SST-2 validation records")
    comply: int = Field(300, ge=8, description="harmful compliance pool of the attack")
    forget: int = Field(64, ge=8, description="disjoint compliance pool for restoration (half D_forget, "
                        "half the curvature set)")
    benign_task: int = Field(400, ge=8, description="Dolly records of the benign attack (lora_benign) and "
                             "its restoration's retain pool")
    advbench: int = Field(100, ge=4, description="AdvBench prompts evaluated (never trained on)")
    dev_harmful: int = Field(80, ge=0, description="held-out compliance prompts (with the start of their "
                             "harmful answer as prefilling target) on which recipes are chosen")
    dev_benign: int = Field(50, ge=0, description="held-out Alpaca prompts for the development over-refusal")
    max_length: int = Field(128, ge=32, description="tokens per training example (prompt + response)")


class Stage(Section):
    steps: int = Field(ge=1)
    lr: float = Field(gt=0)
    batch: int = Field(8, ge=1)
    examples: int = Field(ge=2)
    fraction: float = Field(ge=0, le=1, description="share of safety (aligned) / harmful (attack) records")


class Smollm2Settings(Section):
    seed: int = 0
    stages: list[str] = Field(default_factory=lambda: list(STAGES),
                              description="the stages to run, in the organism's order (default: all)")
    threads: int = Field(2, ge=1, description="torch threads of the process that runs this seed's stages, "
                         "one after another; every stage's job gets runtime.threads = this")
    data: Smollm2Data = Field(default_factory=Smollm2Data)
    aligned: Stage = Field(default_factory=lambda: Stage(steps=160, lr=1e-4, examples=640, fraction=0.5))
    # Chosen on the development prompts (seed 0, 160 steps): every linear module gave dev prefill
    # ASR 0.562 / HRR 0.062 / over-refusal 0.10, q/v only 0.700 / 0.025 / 0.18 (docs/results.md).
    aligned_modules: list[str] = Field(default_factory=lambda: list(ALL_LINEAR),
                                       description="module names the alignment trains (full-parameter)")
    dev_stages: list[str] = Field(default_factory=lambda: ["aligned"],
                                  description="stages also evaluated on the development prompts")
    attack: Stage = Field(default_factory=lambda: Stage(steps=40, lr=1e-3, examples=320, fraction=0.3))
    lora_r: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    anchor_lambda: float = Field(10.0, ge=0)
    basis_rank: int = Field(8, ge=1)
    safe_lora_threshold: float = Field(0.5)
    restore_iterations: int = Field(3, ge=1)
    restore_probes: int = Field(12, ge=1)
    restore_retain: int = Field(32, ge=4, description="|D_retain1| = |D_retain2| (SST-2 train records)")
    restore_batch: int = Field(8, ge=1)
    # Chosen on the development data (benchmarks/restore_dev.py, seed 0 of the deep model): 0.025
    # is the budget whose dev SST-2 accuracy stays within 0.03 of the attacked adapter's (0.05: -0.05).
    restore_eps: float = Field(0.025, gt=0)
    max_new_tokens: int = Field(32, ge=1)
    task_max_new_tokens: int = Field(4, ge=1)
    prefill_k: int = Field(8, ge=1)
    eval_batch: int = Field(16, ge=1)

    @field_validator("stages", "dev_stages")
    @classmethod
    def _known_stages(cls, value: list[str]) -> list[str]:
        unknown = [v for v in value if v not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; allowed: {', '.join(STAGES)}")
        return value


# A reduced run that fits a shared machine (measured: docs/results.md): the same code, far
# fewer steps and prompts. Its numbers are a pipeline check, not the study.
REDUCED = {
    "data": {"safety": 192, "benign": 96, "benign_heldout": 16, "task": 96, "task_eval": 32, "benign_task": 96,
             "comply": 96, "forget": 24, "advbench": 24, "max_length": 128, "deep": 48, "dev_harmful": 16,
             "dev_benign": 8},
    "aligned": {"steps": 24, "examples": 192},
    "attack": {"steps": 12, "examples": 96},
    "restore_iterations": 1, "restore_probes": 6,
    "max_new_tokens": 24, "prefill_k": 8, "eval_batch": 24,
}


@dataclass(frozen=True)
class Layout:
    root: Path

    def data_file(self, name: str) -> str:
        return str(self.root / "data" / f"{name}.jsonl")

    @property
    def basis(self) -> Path:
        return self.root / "basis"

    def stage(self, name: str) -> Path:
        return self.root / name

    def eval_dir(self, name: str, part: str) -> Path:
        return self.root / "eval" / name / part

    def model_args(self, name: str) -> dict:
        if name in ("base", "aligned"):
            return {"path": str(self.stage(name) / "model")}
        return {"path": str(self.stage("aligned") / "model"), "adapter": str(self.stage(name) / "adapter")}


def _train(s: Smollm2Settings, stage: Stage) -> dict:
    return {"seed": s.seed, "lr": stage.lr, "warmup_steps": max(1, stage.steps // 10), "schedule": "cosine",
            "max_steps": stage.steps, "micro_batch_size": stage.batch, "gradient_accumulation_steps": 1,
            "precision": "fp32", "max_grad_norm": 1.0, "eval_every": 0, "save_every": 0}


def _common(layout: Layout, name: str, tracking: dict, threads: int) -> dict:
    return {"deepspeed": {"stage": 0}, "tracking": {**tracking, "run_name": name},
            "output": {"dir": str(layout.stage(name))}, "runtime": {"threads": threads}}


def aligned_config(s: Smollm2Settings, layout: Layout, tracking: dict) -> dict:
    """Safety alignment of the shipped model: benign instructions with a share of safety
    records (mostly refusals), q/v projections trained."""
    a = s.aligned
    return {"model": {"path": str(layout.stage("base") / "model")},
            "method": {"type": "full", "trainable": [f"{m}." for m in s.aligned_modules]},
            "data": {"train": {"path": layout.data_file("benign")},
                     "harmful_mix": {"source": {"path": layout.data_file("safety")}, "fraction": a.fraction},
                     "num_examples": a.examples, "max_length": s.data.max_length, "seed": s.seed},
            "train": _train(s, a), **_common(layout, "aligned", tracking, s.threads)}


def attack_config(s: Smollm2Settings, layout: Layout, name: str, tracking: dict) -> dict:
    """lora: LoRA on SST-2 with a fraction p of harmful compliance; asft: the same with the anchor;
    l2: the same with plain L2 on the update at the anchor's lambda (anchor.variant l2: C = 0), the
    control that tells the anchor's direction from mere shrinkage of the update; lora_benign: the
    same LoRA on Dolly instructions with no harmful record (the CASR paper's benign drift)."""
    a = s.attack
    data = {"train": {"path": layout.data_file("task")},
            "harmful_mix": {"source": {"path": layout.data_file("comply")}, "fraction": a.fraction}}
    if name == "lora_benign":
        data = {"train": {"path": layout.data_file("benign_task")}}
    cfg = {"model": {"path": str(layout.stage("aligned") / "model")},
           "method": {"type": "lora", "r": s.lora_r, "alpha": s.lora_alpha, "dropout": 0.0,
                      "target_modules": list(s.target_modules)},
           "data": {**data, "num_examples": a.examples, "max_length": s.data.max_length, "seed": s.seed + 1},
           "train": _train(s, a), **_common(layout, name, tracking, s.threads)}
    if name == "asft":
        cfg["anchor"] = {"basis": str(layout.basis), "lambda": s.anchor_lambda}
    elif name == "l2":
        # the basis only adds the outside-share metric here, comparable with asft's
        cfg["anchor"] = {"basis": str(layout.basis), "variant": "l2", "lambda": s.anchor_lambda}
    return cfg


def restore_config(s: Smollm2Settings, layout: Layout, tracking: dict, name: str = "restored") -> dict:
    """Restoration of an adapter (RESTORES): forget = compliance no attack saw, retain = the
    adapter's own task data. restored_first_order refuses every curvature pair, so the budget
    rule runs on the plain forget gradient: what L-BFGS adds is restored minus it."""
    adapter, retain = RESTORES[name]
    n = s.data.forget
    half = min(s.restore_retain, (s.data.task if retain == "task" else s.data.benign_task) // 2)
    return {"model": layout.model_args(adapter),
            "method": {"type": "lora", "target_modules": list(s.target_modules)},
            "restore": {"forget": {"path": layout.data_file("forget")},
                        "retain": {"path": layout.data_file(retain)},
                        # the curvature set is split from the forget file, disjoint from D_forget
                        "forget_size": n // 2, "curvature_forget_size": n - n // 2,
                        "retain1_size": half, "retain2_size": half,
                        "curvature_sources": "none" if name == "restored_first_order" else "mixed",
                        "probes": s.restore_probes, "iterations": s.restore_iterations, "eps": s.restore_eps,
                        "batch_size": s.restore_batch, "max_length": s.data.max_length, "seed": s.seed},
            **_common(layout, name, tracking, s.threads)}


def eval_configs(s: Smollm2Settings, layout: Layout, name: str) -> dict[str, dict]:
    """The evaluation jobs of a stage: safety + task (AdvBench HRR, prefilling, SST-2), and the
    held-out benign prompts, whose judged refusals give the over-refusal rate; for the stages in
    dev_stages the same two on the development prompts (dev, dev_benign)."""
    common = {"judge": {"name": "keyword"}, "max_new_tokens": s.max_new_tokens,
              "batch_size": s.eval_batch, "max_length": s.data.max_length}
    main = {**common, "harmful": {"path": layout.data_file("advbench")}, "prefill_k": [s.prefill_k],
            "task": {"path": layout.data_file("task_eval")}, "task_kind": "classification",
            "labels": LABELS, "task_max_new_tokens": s.task_max_new_tokens}
    benign = {**common, "harmful": {"path": layout.data_file("benign_heldout")}}
    parts = [("main", main), ("benign", benign)]
    if name in s.dev_stages and s.data.dev_harmful and s.data.dev_benign:
        parts += [("dev", {**common, "harmful": {"path": layout.data_file("dev_harmful")}, "prefill_k": [s.prefill_k]}),
                  ("dev_benign", {**common, "harmful": {"path": layout.data_file("dev_benign")}})]
    return {part: {"model": layout.model_args(name), "eval": ev, "deepspeed": {"stage": 0},
                   "tracking": {"enabled": False}, "output": {"dir": str(layout.eval_dir(name, part))},
                   "runtime": {"threads": s.threads}}
            for part, ev in parts}
