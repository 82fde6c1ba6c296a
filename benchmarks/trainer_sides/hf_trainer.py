"""The Hugging Face Trainer side of benchmarks/trainer.py: the same model, LoRA, data order and
DeepSpeed JSON, trained by transformers.Trainer.

    python hf_trainer.py STREAM.json DS_CONFIG.json RESULT.json"""

import json
import os
import sys
import time

import torch

spec = json.load(open(sys.argv[1]))
torch.set_num_threads(spec["threads"])
for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                   ("MASTER_PORT", str(spec["port"]))):
    os.environ.setdefault(key, value)
from peft import LoraConfig, get_peft_model  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from side_model import load  # noqa: E402
from padding import pad_batch  # noqa: E402  (this folder is the script's sys.path[0])
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

torch.manual_seed(spec["seed"])
model = load(spec)
model = get_peft_model(model, LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=0.0,
                                         target_modules=spec["target_modules"], task_type="CAUSAL_LM"))
pad = spec["pad_id"]
micro = len(spec["steps"][0][0])
flat = [e for step in spec["steps"] for mb in step for e in mb]


def collate(examples):
    return pad_batch(examples, pad)


class InOrder(Trainer):
    def get_train_dataloader(self):  # safebasin's order, not a shuffle
        return self.accelerator.prepare(DataLoader(flat, batch_size=micro, shuffle=False, collate_fn=collate))


class Clock(TrainerCallback):
    def __init__(self):
        self.ends = []

    def on_train_begin(self, args, state, control, **kw):
        self.ends.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kw):
        self.ends.append(time.perf_counter())


clock = Clock()
args = TrainingArguments(output_dir=os.path.dirname(sys.argv[3]) + "/hf_out", per_device_train_batch_size=micro,
                         gradient_accumulation_steps=len(spec["steps"][0]), learning_rate=spec["lr"],
                         lr_scheduler_type="cosine", warmup_steps=spec["warmup"], max_steps=len(spec["steps"]),
                         max_grad_norm=1.0, weight_decay=0.0, report_to=[], logging_steps=10 ** 9,
                         save_strategy="no", deepspeed=sys.argv[2], dataloader_num_workers=0, seed=spec["seed"],
                         disable_tqdm=True, remove_unused_columns=False,
                         bf16=spec.get("dtype") == "bfloat16", use_cpu=spec.get("device", "cpu") == "cpu",
                         gradient_checkpointing=bool(spec.get("gradient_checkpointing")),
                         gradient_checkpointing_kwargs={"use_reentrant": False})
trainer = InOrder(model=model, args=args, train_dataset=flat, data_collator=collate, callbacks=[clock])
trainer.train()
tokens = [sum(len(e["input_ids"]) for mb in step for e in mb) for step in spec["steps"]]
json.dump({"step_ends": clock.ends, "tokens": tokens, "losses": []}, open(sys.argv[3], "w"))
