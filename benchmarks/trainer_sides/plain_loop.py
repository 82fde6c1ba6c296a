"""The plain baseline of benchmarks/trainer.py: a PyTorch + PEFT loop, nothing else.

    python plain_loop.py STREAM.json RESULT.json

STREAM.json (written by trainer.py) holds the model, LoRA and optimizer settings and the
tokenised micro-batches of every step, in the order safebasin trains them."""

import json
import sys
import time

import torch

spec = json.load(open(sys.argv[1]))
torch.set_num_threads(spec["threads"])
from peft import LoraConfig, get_peft_model  # noqa: E402
import math  # noqa: E402

from side_model import load  # noqa: E402
from padding import pad_batch  # noqa: E402  (this folder is the script's sys.path[0])

torch.manual_seed(spec["seed"])
device = torch.device(spec.get("device", "cpu"))
model = load(spec)
model = get_peft_model(model, LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=0.0,
                                         target_modules=spec["target_modules"], task_type="CAUSAL_LM"))
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=spec["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                        fused=device.type == "cuda")
total, warmup = len(spec["steps"]), spec["warmup"]


def lr_factor(step):  # safebasin's cosine with its warmup ramp
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
pad = spec["pad_id"]


def collate(examples):
    return {k: v.to(device, non_blocking=True) for k, v in pad_batch(examples, pad).items()}


model.train()
ends, losses, tokens = [time.perf_counter()], [], []
for micro_batches in spec["steps"]:
    step_loss, step_tokens = 0.0, 0
    for examples in micro_batches:
        batch = collate(examples)
        loss = model(**batch, use_cache=False).loss
        (loss / len(micro_batches)).backward()
        step_loss += loss.item() / len(micro_batches)
        step_tokens += sum(len(e["input_ids"]) for e in examples)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    ends.append(time.perf_counter())
    losses.append(step_loss)
    tokens.append(step_tokens)
json.dump({"step_ends": ends, "losses": losses, "tokens": tokens}, open(sys.argv[2], "w"))
