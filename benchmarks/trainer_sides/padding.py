"""Right-padded batches for the baseline sides of benchmarks/trainer.py, written without
safebasin (a baseline must not run the code it is compared with)."""

import torch


def pad_batch(examples: list[dict], pad: int) -> dict[str, torch.Tensor]:
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
