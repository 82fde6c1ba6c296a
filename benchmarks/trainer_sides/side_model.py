"""The model of a baseline side, as its stream spec names it: a checkpoint folder, or an
architecture folder of safebasin's (`arch:<name>`), whose seeded random weights are built the
way safebasin builds them, so every side trains the same weights. The weights are the shared
fixture, like the token stream; the training loop is what each side writes itself."""

import os

import torch

RANDOM_MARK = "safebasin_random_init.json"


def load(spec: dict):
    dtype = getattr(torch, spec.get("dtype", "float32"))
    device = torch.device(spec.get("device", "cpu"))
    if os.path.exists(os.path.join(spec["model"], RANDOM_MARK)):
        from safebasin.safety_core.train.architectures import build_random
        model = build_random(spec["model"], dtype, device)
    else:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype, attn_implementation="sdpa")
        model.to(device)
    if spec.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        model.config.use_cache = False
    return model
