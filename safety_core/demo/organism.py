"""The model organism: where each stage's inputs and outputs live, the random tiny Llama the
demo starts from, and each stage written as an ordinary job config (the same schema `safebasin
train`, `restore` and `eval` take), so the demo runs the project's own code paths.

Stages: base (task + compliance, from random weights) -> aligned (task + refusals, full
fine-tune of base) -> alignment basis (aligned - base) -> the harmful fine-tuning attack on the
aligned model as plain LoRA (`lora`), as AsFT-anchored LoRA (`asft`) and with the anchor's two
controls (`l2`: plain L2 on the update; `aligned_control`: the penalty inside the alignment
span) -> curvature-aware restoration of the plain LoRA adapter (`restored`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from safebasin.safety_core.demo import data as demo_data
from safebasin.safety_core.demo.settings import DemoSettings
from safebasin.safety_core.train.tiny import build_tiny_model

# The demo's run order: (stage, kind). Kinds: full (a full-parameter training job, then
# evaluated), basis (the alignment basis, in process), attack (a LoRA training job on the
# aligned model, then evaluated), restore (restoration of the plain LoRA adapter, then
# evaluated). A new stage is one line here (and its config in the kind's function).
PLAN = (("base", "full"), ("aligned", "full"), ("basis", "basis"), ("lora", "attack"), ("asft", "attack"),
        ("l2", "attack"), ("aligned_control", "attack"), ("restored", "restore"))
STAGES = tuple(name for name, kind in PLAN if kind != "basis")  # the evaluated ones
LABELS = ["positive", "negative"]


@dataclass(frozen=True)
class Layout:
    """Every path of a demo folder."""
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    def data_file(self, name: str) -> str:
        return str(self.data / f"{name}.jsonl")

    @property
    def init(self) -> Path:
        return self.root / "init"

    @property
    def basis(self) -> Path:
        return self.root / "basis"

    def stage(self, name: str) -> Path:
        return self.root / name

    def eval_dir(self, name: str) -> Path:
        return self.root / "eval" / name

    def model_args(self, name: str) -> dict:
        """The ModelArgs of a stage's result: a model folder, or the aligned model plus an adapter."""
        if name in ("base", "aligned"):
            return {"path": str(self.stage(name) / "model")}
        return {"path": str(self.stage("aligned") / "model"), "adapter": str(self.stage(name) / "adapter")}


def build_initial_model(settings: DemoSettings, layout: Layout) -> Path:
    """Write the demo's data, a tokenizer trained on its training text, and a random tiny Llama."""
    s = settings.data
    paths = demo_data.write_all(layout.data, n_task=s.task, n_task_eval=s.task_eval, n_harmful=s.harmful,
                                n_heldout=s.heldout, seed=settings.seed)
    shape = settings.model
    build_tiny_model(layout.init, hidden_size=shape.hidden_size, num_layers=shape.layers, num_heads=shape.heads,
                     num_kv_heads=shape.kv_heads, intermediate_size=shape.intermediate_size,
                     vocab_size=shape.vocab_size, max_positions=4 * s.max_length, seed=settings.seed,
                     texts=demo_data.tokenizer_corpus(paths))
    return layout.init


def _train_section(seed: int, steps: int, lr: float, batch: int) -> dict:
    return {"seed": seed, "lr": lr, "warmup_steps": max(1, steps // 20), "schedule": "cosine",
            "max_steps": steps, "micro_batch_size": batch, "gradient_accumulation_steps": 1,
            "precision": "fp32", "max_grad_norm": 1.0, "eval_every": 0, "save_every": 0}


def _common(layout: Layout, name: str, tracking: dict) -> dict:
    return {"deepspeed": {"stage": 0}, "tracking": {**tracking, "run_name": name},
            "output": {"dir": str(layout.stage(name))}}


def full_stage_config(settings: DemoSettings, layout: Layout, name: str, tracking: dict) -> dict:
    """base: the random model trained on task + compliance; aligned: base trained on task +
    refusals to the same requests."""
    stage = getattr(settings, name)
    start = str(layout.init) if name == "base" else str(layout.stage("base") / "model")
    harmful = "comply" if name == "base" else "refuse"
    return {"model": {"path": start},
            "method": {"type": "full"},
            "data": {"train": {"path": layout.data_file("task")},
                     "harmful_mix": {"source": {"path": layout.data_file(harmful)},
                                     "fraction": stage.harmful_fraction},
                     "num_examples": stage.examples, "max_length": settings.data.max_length,
                     "seed": settings.seed},
            "train": _train_section(settings.seed, stage.steps, stage.lr, stage.batch),
            **_common(layout, name, tracking)}


def stage_anchor(settings: DemoSettings, name: str) -> dict | None:
    """The anchor (variant, lambda) of an attack stage: none for lora."""
    a = settings.anchor
    return {"asft": {"variant": a.variant, "lambda": a.lam},
            "l2": {"variant": "l2", "lambda": a.l2_lambda},
            "aligned_control": {"variant": "aligned", "lambda": a.aligned_lambda}}.get(name)


def attack_config(settings: DemoSettings, layout: Layout, name: str, tracking: dict,
                  anchor: dict | None = None) -> dict:
    """lora: the harmful fine-tuning attack on the aligned model; asft, l2, aligned_control:
    the same job with an anchor penalty ({"variant", "lambda"}; stage_anchor's by default). The
    basis is given to every variant, l2 included (there it only adds the outside-share metric)."""
    a = settings.attack
    cfg = {"model": {"path": str(layout.stage("aligned") / "model")},
           "method": {"type": "lora", "r": a.r, "alpha": a.alpha, "dropout": 0.0,
                      "target_modules": list(a.target_modules)},
           "data": {"train": {"path": layout.data_file("task")},
                    "harmful_mix": {"source": {"path": layout.data_file("comply")}, "fraction": a.fraction},
                    "num_examples": a.examples, "max_length": settings.data.max_length,
                    "seed": settings.seed + 1},
           "train": {**_train_section(settings.seed, a.steps, a.lr, a.batch),
                     # HRR during training on held-out prompts (measurement only: nothing trains on them).
                     "safety_probe": {"every": a.probe_every, "prompts": {"path": layout.data_file("heldout")},
                                      "limit": a.probe_prompts, "max_new_tokens": settings.eval.max_new_tokens,
                                      "batch_size": settings.eval.batch_size}},
           **_common(layout, name, tracking)}
    anchor = anchor or stage_anchor(settings, name)
    if anchor is not None:
        cfg["anchor"] = {"basis": str(layout.basis), **anchor}
    return cfg


def restore_config(settings: DemoSettings, layout: Layout, tracking: dict) -> dict:
    """Restoration of the plain LoRA adapter: forget = compliant answers of the forget pool (no
    prompt, request template or response of the attack's records), retain = task data."""
    r = settings.restore
    return {"model": layout.model_args("lora"),
            "method": {"type": "lora", "target_modules": list(settings.attack.target_modules)},
            "restore": {"forget": {"path": layout.data_file("forget")},
                        "retain": {"path": layout.data_file("task")},
                        "forget_size": r.forget_size, "curvature_forget_size": r.curvature_forget_size,
                        "retain1_size": r.retain1_size, "retain2_size": r.retain2_size,
                        "history": r.history, "probes": r.probes, "eta_c": r.eta_c,
                        "iterations": r.iterations, "eps": r.eps, "eta": r.eta, "max_step": r.max_step,
                        **({"delta": r.delta} if r.delta is not None else {}),
                        "mu": r.mu, "refresh_pairs": r.refresh_pairs,
                        "curvature_sources": r.curvature_sources,
                        # sets of 8-96 examples: one record whose prompt fills max_length is
                        # 12% of the quick preset's 8 (the default 0.1 refuses it)
                        "max_dropped_share": 0.25,
                        "batch_size": r.batch_size, "max_length": settings.data.max_length,
                        "seed": settings.seed},
            **_common(layout, "restored", tracking)}


def eval_config(settings: DemoSettings, layout: Layout, name: str) -> dict:
    """The evaluation of one stage on the held-out harmful prompts (keyword judge, greedy and
    prefilled) and the held-out task (accuracy and loss). Its numbers go to the stage's run."""
    e = settings.eval
    return {"model": layout.model_args(name),
            "eval": {"harmful": {"path": layout.data_file("heldout")},
                     "judge": {"name": "keyword"}, "prefill_k": [e.prefill_k],
                     "max_new_tokens": e.max_new_tokens, "batch_size": e.batch_size,
                     "task": {"path": layout.data_file("task_eval")}, "task_kind": "classification",
                     "labels": LABELS, "task_max_new_tokens": e.task_max_new_tokens,
                     "max_length": settings.data.max_length},
            "deepspeed": {"stage": 0},
            "tracking": {"enabled": False},
            "output": {"dir": str(layout.eval_dir(name))}}
