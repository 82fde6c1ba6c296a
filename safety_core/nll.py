"""The response negative log-likelihood, the one loss every method measures: the trainer's
held-out loss, restoration's forget and retain losses, correlation and landscapes.

Labels are the input ids with prompt and padding positions set to IGNORE_INDEX, so the loss
is taken on response tokens only (train/data.py encodes them that way).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from safebasin.safety_core.distributed import all_reduce_sum

IGNORE_INDEX = -100


def response_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token NLL, number of response tokens) per row; differentiable. Taken in
    fp32 whatever the logits' dtype: bf16 log-softmax loses the small differences losses are
    compared by."""
    labels = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                          reduction="none")
    return nll.sum(1), (labels != IGNORE_INDEX).sum(1)


def target_tokens(example: dict) -> int:
    """Tokens the shifted next-token loss is taken on (a label at position 0 is never predicted)."""
    return sum(1 for t in example["labels"][1:] if t != IGNORE_INDEX)


def sharded_mean_nll(forward: Callable[[dict], torch.Tensor], batches: Sequence[Sequence[dict]],
                     to_inputs: Callable[[list[dict]], dict], *, rank: int, world: int, collective: bool,
                     backward: Callable[[torch.Tensor], None] | None = None) -> float:
    """Token-weighted mean response NLL over every example of `batches`, over all ranks.

    Rank r takes examples r, r + world, ... of each batch, so a batch's result does not depend
    on the world size. With `collective` (ZeRO-3: every forward gathers parameters) a rank with
    no example in a batch still runs the batch's first one, with weight 0. With `backward`,
    backward(loss share) is called per batch, the shares summing to the mean over all ranks.
    """
    total = sum(target_tokens(e) for b in batches for e in b)
    if total == 0:
        raise ValueError("no response tokens to take a loss on (all responses truncated away?)")
    local = 0.0
    for batch in batches:
        mine = list(batch[rank::world])
        if not mine and not collective:
            continue
        inputs = to_inputs(mine or list(batch[:1]))
        with torch.set_grad_enabled(backward is not None):
            nll = response_nll(forward(inputs), inputs["labels"])[0].sum() * (1.0 if mine else 0.0)
            if backward is not None:
                backward(nll / total)
        local += nll.item()
    return all_reduce_sum([local])[0] / total
