"""The named builders a study may use, and the pool writer: what turns a study's `data` and
`models` sections into files in its seed folder. A data builder declares the names of the files
it writes, so a study's `${data.NAME}` references are checked before anything is written.

May import the organisms' generators (safety_core.demo.data, smollm2_data) and safety_core.train.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DataBuilder:
    write: Callable[..., dict[str, Path]]  # (out_dir, **args) -> {name: path}
    names: tuple[str, ...]
    doc: str


def _tiny_organism(out: Path, *, task: int, task_eval: int, harmful: int, heldout: int, seed: int) -> dict:
    from safebasin.safety_core.demo import data
    return data.write_all(out, n_task=task, n_task_eval=task_eval, n_harmful=harmful, n_heldout=heldout, seed=seed)


def _smollm2_organism(out: Path, *, dir: str, safety: int, benign: int, benign_heldout: int, task: int,
                      task_eval: int, comply: int, forget: int, advbench: int, benign_task: int, deep: int,
                      dev_harmful: int, dev_benign: int, seed: int) -> dict:
    from safebasin.safety_core.demo import smollm2_data
    return smollm2_data.write_all(dir, out, n_safety=safety, n_benign=benign, n_benign_heldout=benign_heldout,
                                  n_task=task, n_task_eval=task_eval, n_comply=comply, n_forget=forget,
                                  n_advbench=advbench, seed=seed, n_benign_task=benign_task, n_deep=deep,
                                  n_dev_harmful=dev_harmful, n_dev_benign=dev_benign)


DATA_BUILDERS = {
    "tiny-organism": DataBuilder(
        _tiny_organism, ("task", "task_eval", "comply", "refuse", "forget", "heldout"),
        "the tiny organism's synthetic sets (safety_core/demo/data.py); args: task, task_eval, harmful, "
        "heldout, seed"),
    "smollm2-organism": DataBuilder(
        _smollm2_organism, ("safety", "benign", "benign_heldout", "task", "task_eval", "comply", "forget",
                            "advbench", "benign_task", "dev_harmful", "dev_benign"),
        "the SmolLM2 organism's sets from the shared public data (safety_core/demo/smollm2_data.py); args: "
        "dir (the shared data folder), the counts of examples/studies/smollm2.yaml's vars.data, seed"),
}


def _tiny_llama(out: Path, *, corpus: list[str], seed: int, hidden_size: int = 64, layers: int = 2,
                heads: int = 4, kv_heads: int = 2, intermediate_size: int = 176, vocab_size: int = 1024,
                max_positions: int = 512) -> Path:
    """A random tiny Llama whose tokenizer learns the prompts and responses of the `corpus` files."""
    from safebasin.safety_core.train.tiny import build_tiny_model
    texts = []
    for path in corpus:
        for line in Path(path).read_text().splitlines():
            rec = json.loads(line)
            texts += [rec["prompt"], rec["response"]]
    return build_tiny_model(out, hidden_size=hidden_size, num_layers=layers, num_heads=heads,
                            num_kv_heads=kv_heads, intermediate_size=intermediate_size, vocab_size=vocab_size,
                            max_positions=max_positions, seed=seed, texts=texts)


MODEL_BUILDERS: dict[str, Callable[..., Path]] = {"tiny-llama": _tiny_llama}


def builder_problem(kind: str, where: str, builder: str, args: dict) -> str | None:
    """Why a builder entry (kind data or models, at `where`) cannot run: an unknown builder, or
    arguments it does not take."""
    import inspect
    table = DATA_BUILDERS if kind == "data" else MODEL_BUILDERS
    if builder not in table:
        return f"{where}: unknown builder {builder!r}; known: {sorted(table)}"
    fn = table[builder].write if kind == "data" else table[builder]
    params = [p for p in inspect.signature(fn).parameters.values() if p.kind == p.KEYWORD_ONLY]
    allowed = sorted(p.name for p in params)
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        return f"{where}.args: unknown argument(s) {unknown}; builder {builder} takes: {allowed}"
    missing = sorted(p.name for p in params if p.default is p.empty and p.name not in args)
    if missing:
        return f"{where}.args: {builder} needs {missing}"
    return None


def write_pool(name: str, source: dict, splits: dict[str, int], seed: int, shuffle: bool, out: Path) -> dict[str, Path]:
    """Read a source once, drop repeated records, shuffle, and write its splits as disjoint
    consecutive slices: no record (and no duplicate of one) lands in two splits."""
    from safebasin.safety_core.train.data import DataSource, read_records
    from safebasin.safety_core.train.synthetic import write_jsonl
    seen, records = set(), []
    for _, rec in read_records(DataSource(**source)):
        key = json.dumps(rec, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            records.append(rec)
    if shuffle:
        random.Random(seed).shuffle(records)
    wanted = sum(splits.values())
    if wanted > len(records):
        raise ValueError(f"data.pools.{name}: its splits ask for {wanted} records ({splits}); the source "
                         f"has {len(records)} distinct ones")
    files, start = {}, 0
    for split, n in splits.items():
        files[split] = write_jsonl([json.loads(json.dumps(r, default=str)) for r in records[start:start + n]],
                                   out / f"{split}.jsonl")
        start += n
    return files
