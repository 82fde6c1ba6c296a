"""Batched greedy generation from conversations, with optional prefilling of the target response
(the prefilling attack), sharded over ranks when torch.distributed is initialized."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass

import torch
from safebasin.safety_core.distributed import chunks, is_zero3, map_batches
from safebasin.safety_core.train import data as data_lib
from safebasin.safety_core.train.data import Conversation


@dataclass(frozen=True)
class Generation:
    origin: str
    prompt: str                     # the last user message, what a judge is shown
    response: str                   # decoded forced + generated tokens
    prompt_ids: tuple[int, ...]
    forced_ids: tuple[int, ...]     # the prefilled target tokens (empty without prefill)
    new_ids: tuple[int, ...]        # greedy tokens after them, end-of-sequence excluded

    @property
    def response_ids(self) -> tuple[int, ...]:
        return self.forced_ids + self.new_ids

    def to_record(self) -> dict:
        rec = asdict(self)
        for key in ("prompt_ids", "forced_ids", "new_ids"):
            rec[key] = list(rec[key])
        return rec


def split_prompt_completion(tokenizer, conv: Conversation) -> tuple[list[int], list[int]]:
    """Prompt ids (with the generation prompt) and the completion ids of conv.response, tokenized
    exactly as training tokenizes them (data.encode), so prefilled tokens match trained ones."""
    enc = data_lib.encode(tokenizer, conv, max_length=sys.maxsize)
    n_prompt = sum(1 for t in enc["labels"] if t == data_lib.IGNORE_INDEX)
    return enc["input_ids"][:n_prompt], enc["input_ids"][n_prompt:]


def eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends a turn: the tokenizer's eos and the model's generation eos (a list for
    chat models such as Llama 3, whose turns end with <|eot_id|>)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(gen_eos)
    return sorted(ids)


def pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token to pad batches with")
    return tokenizer.eos_token_id


def left_pad(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def _forced_ids(conv: Conversation, completion: list[int], k: int, stop: set[int]) -> list[int]:
    if k and not conv.response:
        raise ValueError(f"{conv.origin}: prefilling needs a target response, but this record has none")
    forced = completion[:k]
    # A target shorter than K would otherwise force its end-of-turn and leave nothing to generate.
    cut = next((i for i, t in enumerate(forced) if t in stop), len(forced))
    return forced[:cut]


def prepare(tokenizer, conversations: list[Conversation], prefill_tokens: int, stop: list[int]) -> list[tuple]:
    """(index, conversation, prompt ids, forced ids) per conversation, sorted by length (less
    padding, and batches that do not depend on the world size): what every engine decodes."""
    if prefill_tokens < 0:
        raise ValueError(f"prefill_tokens must be >= 0, got {prefill_tokens}")
    items = []
    for i, conv in enumerate(conversations):
        prompt_ids, completion = split_prompt_completion(tokenizer, conv)
        items.append((i, conv, prompt_ids, _forced_ids(conv, completion, prefill_tokens, set(stop))))
    return sorted(items, key=lambda it: len(it[2]) + len(it[3]))


def finish(item: tuple, generated: list[int], stop: list[int], tokenizer) -> tuple[int, Generation]:
    """The Generation of a prepared item from the ids an engine produced after its prompt."""
    i, conv, prompt_ids, forced = item
    end = next((j for j, t in enumerate(generated) if t in stop), len(generated))
    new = list(generated[:end])
    text = tokenizer.decode(forced + new, skip_special_tokens=True)
    return i, Generation(conv.origin, conv.prompt_text, text, tuple(prompt_ids), tuple(forced), tuple(new))


def generate(model, tokenizer, conversations: list[Conversation], *, max_new_tokens: int = 64,
             batch_size: int = 8, prefill_tokens: int = 0, progress: bool = True,
             desc: str = "generate") -> list[Generation]:
    """Greedy completions of `conversations`, in their order, on every rank.

    With prefill_tokens=K the first K tokens of each conversation's response (its target) are
    appended after the generation prompt and generation continues from there; the returned
    response includes them. Forced tokens stop short of an end-of-turn token, so a target shorter
    than K is forced whole. Batches are built from length-sorted prompts (less padding) before
    they are sharded over ranks, so the result does not depend on the world size. `model` is a
    transformers model, or an engine with this method (measure/vllm_engine.py).
    """
    if hasattr(model, "generate_conversations"):
        return model.generate_conversations(tokenizer, conversations, max_new_tokens=max_new_tokens,
                                            prefill_tokens=prefill_tokens, progress=progress, desc=desc)
    stop = eos_ids(model, tokenizer)
    pad = pad_id(tokenizer)
    order = prepare(tokenizer, conversations, prefill_tokens, stop)
    device = next(model.parameters()).device
    sync = is_zero3(model)

    @torch.no_grad()
    def run(batch):
        ids, mask = left_pad([p + f for _, _, p, f in batch], pad, device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, num_beams=1, eos_token_id=stop, pad_token_id=pad,
                             synced_gpus=sync)
        return [finish(item, row, stop, tokenizer) for row, item in zip(out[:, ids.shape[1]:].tolist(), batch)]

    was_training = model.training
    model.eval()
    try:
        done = map_batches(run, chunks(order, batch_size), sync=sync, desc=desc, progress=progress)
    finally:
        model.train(was_training)
    return [g for _, g in sorted(done, key=lambda x: x[0])]
