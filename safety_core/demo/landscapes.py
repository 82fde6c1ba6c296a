"""The demo's safety landscapes, both centred on the aligned model: HRR along the alignment
direction (a = -1 is the base model) and along the attack's delta (a = 1 is the plain-LoRA
attacked model, its adapter merged), with the basin width around a = 0."""

from __future__ import annotations

from pathlib import Path

import torch
from safebasin.safety_core.demo.organism import Layout
from safebasin.safety_core.demo.settings import DemoSettings
from safebasin.safety_core.measure.basin import SafetyLandscapeArgs, safety_landscape
from safebasin.safety_core.measure.directions import delta_direction
from safebasin.safety_core.measure.judges import JudgeArgs, make_judge
from safebasin.safety_core.measure.landscape_job import load_merged
from safebasin.safety_core.train.data import DataSource, load_prompts
from safebasin.safety_core.train.modeling import ModelArgs, load_tokenizer


def _state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def run(settings: DemoSettings, layout: Layout, out_dir: str | Path) -> dict:
    """{direction: safety_landscape result} for `alignment` and `attack`; PNG and CSV under
    out_dir/<direction>/."""
    out = Path(out_dir)
    cpu = torch.device("cpu")
    aligned_args = ModelArgs(**layout.model_args("aligned"))
    tokenizer = load_tokenizer(aligned_args)
    base = _state(load_merged(ModelArgs(**layout.model_args("base")), cpu))
    attacked = _state(load_merged(ModelArgs(**layout.model_args("lora")), cpu))
    model = load_merged(aligned_args, cpu)
    aligned = _state(model)
    directions = {"alignment": (delta_direction(base, aligned), settings.landscape.alignment_alphas),
                  "attack": (delta_direction(aligned, attacked), settings.landscape.attack_alphas)}
    source = DataSource(path=layout.data_file("heldout"), limit=settings.landscape.prompts)
    prompts = load_prompts(source)
    judge = make_judge(JudgeArgs(name="keyword"))
    results = {}
    for name, (direction, alphas) in directions.items():
        args = SafetyLandscapeArgs(harmful=source, metric="hrr", alphas=alphas, tolerance=0.1,
                                   max_new_tokens=settings.eval.max_new_tokens,
                                   batch_size=settings.eval.batch_size)
        results[name] = safety_landscape(model, tokenizer, {name: direction}, args, out / name,
                                         judge=judge, conversations=prompts)
    return results
