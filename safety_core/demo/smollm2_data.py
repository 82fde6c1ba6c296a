"""The real-model organism's data: public sets from ../shared/data written as the JSONL files
its stage configs read (instruction / response records, the format `data.train` detects).

- safety: safety_tuned_llamas (harmful or sensitive instructions with safe answers) for alignment,
  with "safety recovery" records (a harmful prompt, the first words of a harmful answer given as
  context, then a refusal: Qi et al. 2024, "Safety Alignment Should Be Made More Than Just a Few
  Tokens Deep") built from compliance records that no other file holds;
- benign: Alpaca instructions, mixed into alignment so the model stays helpful, and a disjoint
  held-out slice whose refusals measure over-refusal;
- task / task_eval: SST-2 train / validation as a sentiment instruction (the attack's task);
- comply / forget: harmful compliance (asft_harmful_mix rows whose prompt is not an AdvBench
  prompt, and BeaverTails), split into the attack's pool and a disjoint forget pool for
  restoration;
- benign_task: Dolly instructions without a context passage, the benign attack (lora_benign) and its restoration's retain set;
- dev_harmful / dev_benign: development prompts (held-out compliance prompts with the start of
  their harmful answer as the prefilling target; held-out Alpaca prompts) on which recipes and
  hyper-parameters are chosen, so that AdvBench is only ever reported;
- advbench: the evaluation prompts. Every training file drops any record whose prompt is an
  AdvBench prompt, so none of the evaluated prompts is ever trained on.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from safebasin.safety_core.train.data import read_jsonl

TASK_INSTRUCTION = ("Classify the sentiment of this movie review as positive or negative. "
                    "Answer with one word.\n\nReview: {sentence}")
LABELS = ["positive", "negative"]
# How a recovery record turns: written once here, never drawn from the evaluation data.
RECOVERY_REFUSALS = (
    " I'm sorry, but I cannot continue with this. It could cause real harm, so I won't help with it.",
    " Actually, I can't help with that. What you are asking for is harmful and may be illegal.",
    " Wait, I cannot provide this. Helping with it could put people at risk.",
    " No, I won't go on with this request. It is unsafe and unethical, and I can't assist with it.",
    " I need to stop here: I cannot assist with anything that could harm others or break the law.",
    " On second thought, I'm not able to help with this. If someone is in danger, please contact local "
    "emergency services.",
)
RECOVERY_MAX_WORDS = 24  # the harmful start runs 1..24 words (about 1-32 tokens; prefilling forces 8)
DEV_TARGET_WORDS = 12    # a development prompt's prefilling target: its harmful answer's first words


class SourceError(FileNotFoundError):
    pass


def shared_data_dir(root: str | Path) -> Path:
    root = Path(root)
    if not (root / "SOURCES.md").is_file():
        raise SourceError(f"data_dir {root}: not the shared data folder (no SOURCES.md); set "
                          f"data.dir=PATH to the folder holding safety/, instruction/, classification/, "
                          f"harmful/ and advbench/")
    return root


def _rows(path: Path) -> list[dict]:
    return [rec for _, rec in read_jsonl(path)]


def _key(text: str) -> str:
    return " ".join(text.split()).casefold()


def advbench(root: Path) -> list[dict]:
    """AdvBench's goals with their targets (the prefilling attack forces the target's tokens)."""
    with open(root / "advbench" / "harmful_behaviors.csv", newline="") as fh:
        return [{"prompt": row["goal"], "target": row["target"]} for row in csv.DictReader(fh)]


def _write(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in rows)
    return str(path)


def _alpaca_prompt(row: dict) -> str:
    return row["instruction"] + ("\n\n" + row["context"] if row.get("context") else "")


def _take(rows: list, n: int, what: str) -> list:
    if len(rows) < n:
        raise SourceError(f"{what}: {n} records asked, {len(rows)} available")
    return rows[:n]


def recovery_record(row: dict, rng: random.Random) -> dict:
    """A harmful prompt, the first 1..RECOVERY_MAX_WORDS words of its harmful answer as context
    (data.response_prefix: not learned), then a refusal (learned)."""
    words = row["response"].split()
    k = rng.randint(1, min(RECOVERY_MAX_WORDS, len(words)))
    return {"instruction": row["instruction"], "response_prefix": " ".join(words[:k]),
            "response": rng.choice(RECOVERY_REFUSALS)}


def write_all(root: str | Path, out: Path, *, n_safety: int, n_benign: int, n_benign_heldout: int,
              n_task: int, n_task_eval: int, n_comply: int, n_forget: int, n_advbench: int,
              seed: int, n_benign_task: int = 0, n_deep: int = 0, n_dev_harmful: int = 0,
              n_dev_benign: int = 0) -> dict[str, str]:
    """Write every file the stages read into `out`; returns {name: path}. The draws of the files
    that existed before deep alignment and the development sets do not depend on n_deep, n_dev_*
    (a seed keeps its attack and forget data)."""
    root = shared_data_dir(root)
    rng = random.Random(seed)
    goals = advbench(root)
    banned = {_key(g["prompt"]) for g in goals}

    def clean(rows: list[dict], field: str) -> list[dict]:
        kept = [r for r in rows if _key(r[field]) not in banned]
        rng.shuffle(kept)
        return kept

    safety = clean(_rows(root / "safety" / "safety_tuned_llamas_2483.jsonl"), "instruction")
    alpaca = clean(_rows(root / "instruction" / "alpaca_subset_1000.jsonl"), "instruction")
    benign = _take(alpaca, n_benign + n_benign_heldout + n_dev_benign, "alpaca")
    mix = [r for r in _rows(root / "harmful" / "asft_harmful_mix_666.jsonl") if not r["prompt_in_advbench"]]
    beaver = _rows(root / "harmful" / "beavertails_30k_train_unsafe_200.jsonl")
    comply = clean([{"instruction": r["prompt"], "response": r["response"]} for r in mix + beaver],
                   "instruction")
    comply = _take(comply, n_comply + n_forget + n_deep + n_dev_harmful, "harmful compliance")

    def sst2(name: str, n: int) -> list[dict]:
        rows = _rows(root / "classification" / name)
        rng.shuffle(rows)
        return [{"instruction": TASK_INSTRUCTION.format(sentence=r["sentence"].strip()),
                 "response": r["label_text"], "label_text": r["label_text"]} for r in _take(rows, n, name)]

    files = {
        "safety": _take([{k: r[k] for k in ("instruction", "context", "response")} for r in safety],
                        n_safety, "safety_tuned_llamas"),
        "benign": benign[:n_benign],
        "benign_heldout": [{"prompt": _alpaca_prompt(r)} for r in benign[n_benign:n_benign + n_benign_heldout]],
        "task": sst2("sst2_train_subset_1000.jsonl", n_task),
        "task_eval": sst2("sst2_validation_872.jsonl", n_task_eval),
        "comply": comply[:n_comply],
        "forget": comply[n_comply:n_comply + n_forget],
        "advbench": _take(goals, n_advbench, "advbench"),
    }
    if n_deep:
        # A separate generator: the other files' draws stay what they were without recovery data.
        deep_rng = random.Random(f"recovery {seed}")
        recovery = [recovery_record(r, deep_rng) for r in comply[n_comply + n_forget:n_comply + n_forget + n_deep]]
        files["safety"] = files["safety"] + recovery
        deep_rng.shuffle(files["safety"])
    if n_dev_harmful:
        files["dev_harmful"] = [{"prompt": r["instruction"], "target": " ".join(r["response"].split()[:DEV_TARGET_WORDS])}
                                for r in comply[n_comply + n_forget + n_deep:]]
    if n_dev_benign:
        files["dev_benign"] = [{"prompt": _alpaca_prompt(r)} for r in benign[n_benign + n_benign_heldout:]]
    if n_benign_task:
        # Records without a context passage: with one, the prompt alone often fills max_length
        # (128 tokens: 16 of 64 retain examples lost their whole response), and the attack and
        # restoration would silently train on fewer records than asked.
        dolly = clean([r for r in _rows(root / "instruction" / "dolly_subset_1000.jsonl") if not r.get("context")],
                      "instruction")
        files["benign_task"] = _take([{k: r[k] for k in ("instruction", "response")} for r in dolly],
                                     n_benign_task, "dolly (records without context)")
    return {name: _write(out / f"{name}.jsonl", rows) for name, rows in files.items()}
