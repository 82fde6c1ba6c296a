"""Micro-batches as model inputs: padded rows (one example each) or one packed row.

Packing puts a micro-batch's examples end to end in rows of at most data.max_length tokens,
each with its own position ids
(0, 1, ... restarting per example) and its own response-only labels, and no attention mask.
transformers reads the restarts in `position_ids` as sequence boundaries: flash-attention 2
runs variable-length kernels on them, sdpa and eager get a block-diagonal causal mask, so no
token attends across examples. The forward must run with use_cache=False: transformers looks
for packed sequences only when there is no KV cache. The loss is taken on exactly the tokens of the padded batch, so
a packed step computes the same loss without spending compute on padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from safebasin.safety_core.nll import IGNORE_INDEX
from safebasin.safety_core.train import data as data_lib


@dataclass
class MicroBatch:
    inputs: dict[str, torch.Tensor]
    real_tokens: int   # tokens of the examples
    positions: int     # tokens the model computes (real plus padding)


def padded(examples: list[dict[str, list[int]]], pad_id: int) -> MicroBatch:
    batch = data_lib.collate(examples, pad_id)
    return MicroBatch(batch, int(batch["attention_mask"].sum()), batch["input_ids"].numel())


def packed(examples: list[dict[str, list[int]]], capacity: int, pad_id: int) -> MicroBatch:
    """The examples end to end, in order, in rows of at most `capacity` tokens (a new row when the
    next example does not fit), rows
    padded to the longest. Bounding a row keeps attention at rows x capacity^2 rather than
    (sum of lengths)^2 when the mask is a dense block-diagonal one (sdpa, eager)."""
    rows: list[list[dict]] = []
    used = capacity  # forces a first row
    for e in examples:
        n = len(e["input_ids"])
        if used + n > capacity:
            rows.append([])
            used = 0
        rows[-1].append(e)
        used += n
    width = max(sum(len(x["input_ids"]) for x in r) for r in rows)
    ids, labels, positions = [], [], []
    for row in rows:
        r_ids, r_labels, r_pos = [], [], []
        for e in row:
            r_ids += e["input_ids"]
            # The first token of an example is never predicted from the one before it (that
            # belongs to the previous example); prompts start with masked tokens anyway.
            r_labels += [IGNORE_INDEX] + e["labels"][1:]
            r_pos += range(len(e["input_ids"]))
        fill = width - len(r_ids)
        # Padding is a sequence of its own (positions restart), so no example attends to it.
        ids.append(r_ids + [pad_id] * fill)
        labels.append(r_labels + [IGNORE_INDEX] * fill)
        positions.append(r_pos + list(range(fill)))
    batch = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(positions)}
    real = sum(len(e["input_ids"]) for e in examples)
    return MicroBatch(batch, real, len(rows) * width)


def micro_batch(examples: list[dict[str, list[int]]], pad_id: int, packing: bool, capacity: int) -> MicroBatch:
    return packed(examples, capacity, pad_id) if packing else padded(examples, pad_id)
