"""The anchor regularizer's cost per training step over many adapted layers, where its work is
host-bound: a Llama of 32 small layers with LoRA r 16 on q/k/v/o (128 adapted layers, the count
of Llama-3.1-8B) and a random basis; what is timed is the penalty, its metrics and its
backward, as the trainer runs them once per step (ZeRO 0-2 path). At these sizes the arithmetic
is nil, so the figures are the per-layer overhead (ops dispatched, kernels launched on a GPU)
that a real model pays on top of its own step.

    python benchmarks/anchor_layers.py [--layers 32] [--reps 20]

Prints the step time (best of interleaved rounds) and the number of aten ops dispatched per
step (a count, robust to machine load). Run it with two checkouts' interpreters to compare them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))


class OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(1)
    from gpu_scale import write_random_basis
    from peft import LoraConfig, get_peft_model
    from safebasin.safety_core.anchor.regularizer import AnchorArgs, AnchorRegularizer
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": args.layers, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": 256}
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(LlamaConfig(**cfg)),
                           LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if "lora_B" in name:
                prm.normal_(0, 0.1)
    with tempfile.TemporaryDirectory() as tmp:
        basis = write_random_basis(Path(tmp) / "basis", cfg, ["q_proj", "k_proj", "v_proj", "o_proj"], 16, "cpu")
        reg = AnchorRegularizer(AnchorArgs(basis=str(basis), **{"lambda": 1.0}), model,
                                {"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 1})

    def step():
        reg.loss(model).backward()
        return reg.before_step(None)

    for _ in range(3):
        step()
    best = float("inf")
    for _ in range(args.reps):
        t0 = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t0)
    with OpCount() as count:
        metrics = step()
    print(f"{len(reg.layers)} adapted layers: {best * 1e3:.2f} ms per step (best of {args.reps}), "
          f"{count.n} aten ops dispatched per step ({count.n / len(reg.layers):.1f} per layer); "
          f"penalty {metrics['anchor_penalty']:.6g}, outside share {metrics['anchor_outside_share']:.6g}")


if __name__ == "__main__":
    main()
