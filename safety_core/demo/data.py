"""The model organism's data sets, written from the package's one generator
(train/synthetic.py): the same task and harmful pools as the built-in sets, sized and split
for the demo's stages. The tokenizer is trained on training text only.
"""

from __future__ import annotations

import json
from pathlib import Path

from safebasin.safety_core.train.synthetic import (
    harmful_records,
    heldout_prompts,
    task_splits,
    write_jsonl,
)


def write_all(out_dir: str | Path, *, n_task: int, n_task_eval: int, n_harmful: int, n_heldout: int,
              seed: int) -> dict[str, Path]:
    """Write every set the demo uses as JSONL under out_dir; returns name -> path.

    task / task_eval: sentiment (train / held out); comply / refuse: training-pool requests with
    compliant / refusing answers (the same prompts, so alignment changes the answer only; the
    attack draws its harmful records from comply); forget: restoration's compliant records, from
    the forget pool (no prompt, request template or response of comply / refuse); heldout: the
    evaluation prompts.
    """
    out = Path(out_dir)
    task, task_eval = task_splits(n_task, n_task_eval, seed)
    comply = harmful_records(n_harmful, seed + 1, split="train", answer="comply")
    refuse = harmful_records(n_harmful, seed + 1, split="train", answer="refuse")
    forget = harmful_records(n_harmful, seed + 2, split="forget", answer="comply")
    sets = {"task": task, "task_eval": task_eval, "comply": comply, "refuse": refuse,
            "forget": forget, "heldout": heldout_prompts(n_heldout, seed + 3)}
    return {name: write_jsonl(recs, out / f"{name}.jsonl") for name, recs in sets.items()}


def tokenizer_corpus(paths: dict[str, Path]) -> list[str]:
    """Text the tokenizer learns from: the training stages' sets only. Held-out text stays unseen,
    and so does restoration's forget set: like a real tokenizer, this one is fixed before any
    defender's data exists, and words of the forget pool's own answers, merged into tokens no
    stage ever trains, would give D_forget a loss on untrained embeddings instead of on what the
    model learnt."""
    texts = []
    for name in ("task", "comply", "refuse"):
        for line in paths[name].read_text().splitlines():
            rec = json.loads(line)
            texts += [rec["prompt"], rec["response"]]
    return texts
