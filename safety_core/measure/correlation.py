"""Per-example response NLL, and how well two models' per-example losses agree (Pearson and
Spearman r), with a scatter plot."""

from __future__ import annotations

import csv
import inspect
import math
from pathlib import Path

import numpy as np
import torch
from safebasin.safety_core.distributed import chunks, is_main, is_zero3, map_batches
from safebasin.safety_core.measure.generation import pad_id
from safebasin.safety_core.nll import IGNORE_INDEX, response_nll
from safebasin.safety_core.train import data as data_lib
from safebasin.safety_core.train.data import Conversation


def batch_nll(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed NLL, number of response tokens) per row of a collated batch; differentiable.

    Logits are computed only from the batch's first response position on (`logits_to_keep`):
    prompts are most of an evaluation example, and the output layer and log-softmax over the
    whole vocabulary at every prompt position cost a quarter of the forward pass of a 49k-vocab
    model while adding nothing to the loss."""
    labels = batch["labels"]
    start = 0
    targets = labels != IGNORE_INDEX
    if targets.any() and _keeps_logits(model):
        first = targets.float().argmax(1)[targets.any(1)].min().item()
        start = max(int(first) - 1, 0)  # the logit at p predicts the token at p + 1
    extra = {"logits_to_keep": labels.shape[1] - start} if start else {}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra).logits
    return response_nll(logits, labels[:, start:])


def _keeps_logits(model) -> bool:
    """Whether the (possibly PEFT-wrapped) model's forward takes `logits_to_keep` (transformers'
    causal LMs do; a custom model may not, and then gets the whole sequence)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def example_nll(model, tokenizer, conversations: list[Conversation], *, max_length: int = 512,
                batch_size: int = 8, progress: bool = True, desc: str = "nll") -> list[tuple[float, int]]:
    """(summed NLL over response tokens, token count) per conversation, in order, on every rank.

    Tokenized with data.encode (response-only labels). An example whose response was truncated
    away has count 0. Batches are built from length-sorted examples (less padding) and sharded
    over ranks when torch.distributed is initialized.
    """
    pad = pad_id(tokenizer)
    encoded = [data_lib.encode(tokenizer, c, max_length) for c in conversations]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))
    device = next(model.parameters()).device

    @torch.no_grad()
    def run(idx: list[int]):
        batch = {k: v.to(device) for k, v in data_lib.collate([encoded[i] for i in idx], pad).items()}
        sums, counts = batch_nll(model, batch)
        return list(zip(idx, zip(sums.double().tolist(), counts.tolist())))

    was_training = model.training
    model.eval()
    try:
        done = map_batches(run, chunks(order, batch_size), sync=is_zero3(model), desc=desc, progress=progress)
    finally:
        model.train(was_training)
    return [pair for _, pair in sorted(done, key=lambda x: x[0])]


def mean_nll(pairs: list[tuple[float, int]]) -> float:
    """Token-weighted mean over examples (each response token counts once)."""
    tokens = sum(n for _, n in pairs)
    if tokens == 0:
        raise ValueError("no response tokens to take a loss on (all responses truncated away?)")
    return sum(s for s, _ in pairs) / tokens


def pearson(x, y) -> float:
    """Pearson r; nan when either input is constant (r is undefined there)."""
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape or x.size < 2:
        raise ValueError(f"pearson needs two equal-length inputs of 2+ values, got {x.size} and {y.size}")
    xc, yc = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(xc @ xc) * float(yc @ yc))
    if denom == 0.0:
        return float("nan")
    return float(np.clip((xc @ yc) / denom, -1.0, 1.0))


def rank_average(x) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (as Spearman's r requires)."""
    x = np.asarray(x, dtype=np.float64).ravel()
    order = np.argsort(x, kind="stable")
    ranks = np.empty(x.size, dtype=np.float64)
    sorted_x = x[order]
    start = 0
    for end in range(1, x.size + 1):
        if end == x.size or sorted_x[end] != sorted_x[start]:
            ranks[order[start:end]] = (start + end + 1) / 2.0
            start = end
    return ranks


def spearman(x, y) -> float:
    return pearson(rank_average(x), rank_average(y))


def loss_correlation(model_a, model_b, tokenizer, conversations: list[Conversation], out_dir=None, *,
                     max_length: int = 512, batch_size: int = 8, names: tuple[str, str] = ("model A", "model B"),
                     tokenizer_b=None) -> dict:
    """Per-example mean response NLL of two models on one dataset and their Pearson / Spearman r.

    Examples without response tokens (truncated away) are dropped. With out_dir, rank 0 writes
    loss_correlation.csv and loss_correlation.png (every rank returns their paths).
    """
    a = example_nll(model_a, tokenizer, conversations, max_length=max_length, batch_size=batch_size, desc=names[0])
    b = example_nll(model_b, tokenizer_b or tokenizer, conversations, max_length=max_length,
                    batch_size=batch_size, desc=names[1])
    return correlate(a, b, conversations, out_dir, names=names)


def correlate(a: list[tuple[float, int]], b: list[tuple[float, int]], conversations: list[Conversation],
              out_dir=None, *, names: tuple[str, str] = ("model A", "model B")) -> dict:
    """loss_correlation from per-example (NLL sum, tokens) already computed, so the two models
    never need to be in memory together."""
    keep = [i for i in range(len(conversations)) if a[i][1] > 0 and b[i][1] > 0]
    nll_a = [a[i][0] / a[i][1] for i in keep]
    nll_b = [b[i][0] / b[i][1] for i in keep]
    result = {"n": len(keep), "dropped": len(conversations) - len(keep), "names": list(names),
              "pearson": pearson(nll_a, nll_b), "spearman": spearman(nll_a, nll_b),
              "mean_nll_a": mean_nll([a[i] for i in keep]), "mean_nll_b": mean_nll([b[i] for i in keep]),
              "origins": [conversations[i].origin for i in keep], "nll_a": nll_a, "nll_b": nll_b,
              "files": {}}
    if out_dir is not None:
        out = Path(out_dir)
        result["files"] = {"csv": str(out / "loss_correlation.csv"), "png": str(out / "loss_correlation.png")}
        if is_main():
            _write(result, out, names)
    return result


def _write(result: dict, out: Path, names: tuple[str, str]) -> None:
    from safebasin.safety_core.measure import plots
    out.mkdir(parents=True, exist_ok=True)
    with open(result["files"]["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["origin", f"nll_{names[0]}", f"nll_{names[1]}"])
        w.writerows(zip(result["origins"], result["nll_a"], result["nll_b"]))
    plots.scatter_plot(result["files"]["png"], result["nll_a"], result["nll_b"], xlabel=f"NLL ({names[0]})",
                       ylabel=f"NLL ({names[1]})", diagonal=True,
                       title=f"per-example NLL: Pearson {result['pearson']:.3f}, "
                             f"Spearman {result['spearman']:.3f}")
