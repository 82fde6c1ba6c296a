"""Tokenisation once per dataset: `datasets.map` encodes (in `num_proc` worker processes for
large sets) and the result is kept as an Arrow file named by a key of everything that decides
it, so ranks and resumed or repeated runs read it instead of tokenising again.

The key hashes the conversations themselves (after loading, mixing and sampling), the
tokenizer (its serialised vocabulary, merges and normaliser, special tokens and chat template),
the settings (max_length), and the source of the module that encodes (data.py): changing any
of them makes a new file, never a stale hit.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from pathlib import Path

from safebasin.safety_core.distributed import barrier, local_rank
from safebasin.safety_core.nll import IGNORE_INDEX
from safebasin.safety_core.train import data as data_lib

# Below this many examples worker processes cost more than they save.
MIN_EXAMPLES_PER_PROC = 2000


def cache_root(configured: str | None) -> Path:
    if configured:
        return Path(configured).expanduser()
    from safebasin.safety_core.train.tiny import cache_dir
    return cache_dir() / "tokenized"


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    meta = json.dumps([type(tokenizer).__name__, tokenizer.chat_template, tokenizer.bos_token_id,
                       tokenizer.eos_token_id, tokenizer.pad_token_id, len(tokenizer)], default=str)
    return hashlib.sha256((body + meta).encode()).hexdigest()


def cache_key(tokenizer, convs: list[data_lib.Conversation], max_length: int) -> str:
    h = hashlib.sha256()
    h.update(tokenizer_fingerprint(tokenizer).encode())
    h.update(hashlib.sha256(inspect.getsource(data_lib).encode()).digest())
    h.update(json.dumps({"max_length": max_length}).encode())
    for c in convs:
        h.update(json.dumps([c.messages, c.response, c.response_prefix]).encode())
    return h.hexdigest()[:32]


def encode_cached(tokenizer, convs: list[data_lib.Conversation], max_length: int, *,
                  cache_dir: str | None = None, num_proc: int | None = None) -> tuple[list[dict], Path]:
    """encode_all(tokenizer, convs, max_length), from the cache when it holds this key. Local
    rank 0 of each node tokenises on a miss (the others wait), then every rank reads the file. Returns (examples,
    file). A hit reads the Arrow file with pyarrow alone: importing `datasets` costs seconds."""
    path = cache_root(cache_dir) / f"{cache_key(tokenizer, convs, max_length)}.arrow"
    # Local rank 0 of every node: a cache under a home that nodes do not share is filled on each
    # node; on a shared one the writes are whole files renamed into place, so either wins.
    if local_rank() == 0 and not path.exists():
        _tokenize_to(path, tokenizer, convs, max_length, num_proc)
    barrier()
    import pyarrow as pa
    with pa.memory_map(str(path)) as source:
        table = pa.ipc.open_stream(source).read_all()
    out = [{"input_ids": ids, "labels": labels}
           for ids, labels in zip(table.column("input_ids").to_pylist(), table.column("labels").to_pylist())]
    # As encode_all: an example whose response was truncated away has no loss tokens.
    return [e for e in out if any(t != IGNORE_INDEX for t in e["labels"])], path


def _tokenize_to(path: Path, tokenizer, convs, max_length: int, num_proc: int | None) -> None:
    import datasets
    import pyarrow as pa
    if num_proc is None:
        num_proc = min(os.cpu_count() or 1, len(convs) // MIN_EXAMPLES_PER_PROC)
    table = datasets.Dataset.from_dict({"messages": [json.dumps(c.messages) for c in convs],
                                        "response": [c.response for c in convs],
                                        "response_prefix": [c.response_prefix for c in convs]})

    def encode(row):
        conv = data_lib.Conversation(tuple(json.loads(row["messages"])), row["response"], "",
                                     response_prefix=row["response_prefix"])
        return data_lib.encode(tokenizer, conv, max_length)
    encoded = table.map(encode, remove_columns=["messages", "response", "response_prefix"],
                        num_proc=num_proc if num_proc > 1 else None,
                        keep_in_memory=True, desc="tokenize").data.table
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written aside and renamed: a concurrent job or rank never reads a half-written file.
    tmp = path.with_name(f".{path.name}.{os.uname().nodename}.{os.getpid()}.tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, encoded.schema) as writer:
        writer.write_table(encoded)
    os.replace(tmp, path)
