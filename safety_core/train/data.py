"""Conversation data: the data config (sources, mixtures, the harmful mix), loading from files,
Hugging Face datasets or built-in sets (filtered: filters.py), chat formatting (templated:
templates.py) with response-only loss, and deterministic batching. Mixing is in mixture.py.

(Over 300 lines: reading, formatting and batching share one record model, Conversation, and
every job reads its data through this one path.)"""

from __future__ import annotations

import csv
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Discriminator, Field, Tag, field_validator
from safebasin.safety_core.args import Section
from safebasin.safety_core.nll import IGNORE_INDEX
from safebasin.safety_core.train import filters, synthetic, templates
from safebasin.safety_core.train.errors import (
    DataError,  # also imported from here as data.DataError
)

FILTER_SCALARS = (bool, int, float, str, type(None))
LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
# Canonical field -> the column names tried, in order, when no mapping is configured.
DEFAULT_FIELDS = {
    "messages": ["messages", "conversations"],
    "instruction": ["instruction"],
    "context": ["context", "input"],
    "prompt": ["prompt", "goal", "question", "sentence", "text"],
    "response": ["response", "output", "target", "answer", "completion"],
    "response_prefix": ["response_prefix"],
    "system": ["system"],
}


class DataSource(Section):
    path: str = Field(description="local .jsonl/.json/.csv/.parquet file, builtin:NAME, or a "
                                  "Hugging Face dataset name")
    split: str = "train"
    subset: str | None = Field(None, description="Hugging Face dataset configuration name")
    format: Literal["auto", "instruction", "prompt_response", "messages"] = "auto"
    fields: dict[str, str] = Field(default_factory=dict,
                                   description="canonical field -> column, e.g. {prompt: goal}")
    limit: int | None = Field(None, ge=1, description="records kept (after the filter), in file order")
    filter: dict[str, Any] = Field(
        default_factory=dict, description="keep records whose field equals the value (or one of a "
        "list of values), e.g. {is_safe: false}; applied before limit and sampling")
    template: str | None = Field(None, description="the user message, from record fields: "
                                 "'Classify the sentiment: {sentence}'; {prompt} is the format's prompt")

    @field_validator("fields")
    @classmethod
    def _known_fields(cls, v: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(v) - set(DEFAULT_FIELDS))
        if unknown:
            raise ValueError(f"unknown field name(s) {unknown}; allowed: {sorted(DEFAULT_FIELDS)}")
        return v

    @field_validator("template")
    @classmethod
    def _template_parses(cls, v: str | None) -> str | None:
        if v is not None:
            templates.placeholders(v)
        return v

    @field_validator("filter")
    @classmethod
    def _filter_values(cls, v: dict) -> dict:
        for field, allowed in v.items():
            values = allowed if isinstance(allowed, list) else [allowed]
            if not values:
                raise ValueError(f"filter field {field!r} allows no value (an empty list)")
            bad = [a for a in values if not isinstance(a, FILTER_SCALARS)]
            if bad:
                raise ValueError(f"filter field {field!r}: values are compared for equality, so each must "
                                 f"be a string, number, true/false or null (or a list of them); got {bad[0]!r}")
        return v


class MixtureSource(DataSource):
    """One source of a `data.train` list. Give it `count` (exactly that many examples) or
    `weight` (its share of what the counted sources leave); with neither on any source the
    sources are pooled (each weighted by its size)."""
    name: str | None = Field(None, description="label in the data summary and MLflow; default the file stem")
    weight: float | None = Field(None, gt=0)
    count: int | None = Field(None, ge=1)

    @field_validator("count")
    @classmethod
    def _one_of(cls, v, info):
        if v is not None and info.data.get("weight") is not None:
            raise ValueError("give a mixture source either weight or count, not both")
        return v


class HarmfulMix(Section):
    """The harmful fine-tuning attack: a fraction of the fine-tuning set is harmful."""
    source: DataSource
    fraction: float = Field(ge=0.0, le=1.0)


# One source or a list (a mixture), told apart by the YAML's shape, so that a config error
# names the key in the shape the user wrote instead of the failures of both readings. The tag
# names follow pydantic's own location names, which config error messages leave out.
TrainSources = Annotated[
    Annotated[MixtureSource, Tag("tagged-union[mapping]")] | Annotated[list[MixtureSource], Tag("tagged-union[list]")],
    Discriminator(lambda v: "tagged-union[list]" if isinstance(v, list) else "tagged-union[mapping]")]


class DataArgs(Section):
    train: TrainSources = Field(description="one source, or a list of sources with weight or count (a mixture)")
    eval: DataSource | None = None
    harmful_mix: HarmfulMix | None = None
    num_examples: int | None = Field(None, ge=1, description="n: size of the fine-tuning set "
                                     "(task + harmful); default all of train")
    max_length: int = Field(512, ge=8)
    system_prompt: str | None = None
    seed: int = 0
    packing: bool = Field(False, description="put each micro-batch's examples end to end in rows of "
                          "at most max_length tokens (per-example positions and loss, no attention "
                          "across them) instead of one padded row each")
    cache: bool = Field(True, description="tokenise once and keep the result (keyed by data, "
                        "tokenizer and settings) for ranks and later runs")
    cache_dir: str | None = Field(None, description="where tokenised sets are kept; default "
                                  "$SAFEBASIN_CACHE/tokenized")
    num_proc: int | None = Field(None, ge=1, description="tokenisation worker processes; default: "
                                 "one per 2000 examples, at most one per core")
    max_dropped_share: float = Field(0.1, ge=0, le=1, description="largest share of a set's examples "
                                     "whose response max_length may truncate away entirely (they are "
                                     "dropped, and counted); a set that loses more is refused")

    @field_validator("train", mode="before")
    @classmethod
    def _plain_sources(cls, v):
        """A DataSource object built in Python (the type of data.train before mixtures) is read
        as the mapping it was made from."""
        def plain(src):
            return src.model_dump(exclude_unset=True) if type(src) is DataSource else src
        return [plain(s) for s in v] if isinstance(v, list) else plain(v)


@dataclass(frozen=True)
class Conversation:
    """Prompt messages plus the response the loss is taken on."""
    messages: tuple[dict, ...]
    response: str
    origin: str  # "file:line" for error messages and audit
    record: dict | None = None
    source: str = ""       # the label of the source it came from (data summary)
    harmful: bool = False  # drawn from data.harmful_mix
    # The start of the assistant's turn given as context, not learned: a "safety recovery"
    # record (harmful prompt, the first words of a harmful answer, then a refusal) teaches the
    # refusal after a harmful start without teaching the harmful start itself.
    response_prefix: str = ""

    @property
    def prompt_text(self) -> str:
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")


# ---------------------------------------------------------------------------------------------
# Reading raw records


def read_jsonl(path: Path, origin_name: str | None = None):
    """(origin "file:line", record) per non-blank line; a bad line is a DataError naming it."""
    origin_name = origin_name or str(path)
    with Path(path).open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{origin_name}:{lineno}: not valid JSON ({e.msg})") from None
            yield f"{origin_name}:{lineno}", rec


def _read_local(path: Path, origin_name: str):
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from read_jsonl(path, origin_name)
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{origin_name}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise DataError(f"{origin_name}: expected a JSON list of records")
        for i, rec in enumerate(data):
            yield f"{origin_name}[{i}]", rec
    elif suffix == ".csv":
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            for rec in reader:
                if None in rec:
                    raise DataError(f"{origin_name}:{reader.line_num}: more values than columns")
                yield f"{origin_name}:{reader.line_num}", rec
    elif suffix == ".parquet":
        import pyarrow.parquet as pq
        for i, rec in enumerate(pq.read_table(path).to_pylist()):
            yield f"{origin_name}[{i}]", rec
    else:
        raise DataError(f"{origin_name}: unsupported file type {suffix!r}; use one of {LOCAL_SUFFIXES}")


def _raw_rows(source: DataSource):
    if source.path.startswith("builtin:"):
        recs = synthetic.builtin_records(source.path.removeprefix("builtin:"))
        yield from ((f"{source.path}[{i}]", r) for i, r in enumerate(recs))
    elif Path(source.path).suffix.lower() in LOCAL_SUFFIXES or Path(source.path).exists():
        path = Path(source.path)
        if not path.exists():
            raise DataError(f"{source.path}: no such file")
        yield from _read_local(path, source.path)
    else:
        import datasets
        ds = datasets.load_dataset(source.path, source.subset, split=source.split)
        yield from ((f"{source.path}[{source.split}][{i}]", ds[i]) for i in range(len(ds)))


def read_source(source: DataSource) -> tuple[list[tuple[str, dict]], int]:
    """(origin, record) pairs of a source in file order, filtered, truncated to `limit`; and
    how many records the filter dropped (among those read before the limit was reached)."""
    rows, dropped = [], 0
    for origin, rec in _raw_rows(source):
        if source.filter and not filters.matches(rec, source.filter, origin):
            dropped += 1
            continue
        rows.append((origin, rec))
        if source.limit and len(rows) >= source.limit:
            break
    return rows, dropped


def read_records(source: DataSource) -> list[tuple[str, dict]]:
    """(origin, record) pairs of a source, in file order, filtered and truncated to `limit`."""
    return read_source(source)[0]


# ---------------------------------------------------------------------------------------------
# Records -> conversations


def _column(rec: dict, source: DataSource, field: str) -> str | None:
    names = [source.fields[field]] if field in source.fields else DEFAULT_FIELDS[field]
    return next((n for n in names if n in rec), None)


def _detect_format(rec: dict, source: DataSource) -> str:
    if source.format != "auto":
        return source.format
    for fmt, key in (("messages", "messages"), ("instruction", "instruction"), ("prompt_response", "prompt")):
        if _column(rec, source, key) is not None:
            return fmt
    return "unknown"


def _text(rec: dict, col: str | None, origin: str, what: str, required: bool = True) -> str | None:
    value = rec.get(col) if col else None
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            if col is None:
                raise DataError(f"{origin}: missing or empty {what!r} field (none of its keys {sorted(rec)} "
                                f"is a {what} column; name the column with fields: {{{what}: COLUMN}})")
            raise DataError(f"{origin}: missing or empty {what!r} field (column {col!r})")
        return None
    if not isinstance(value, str):
        raise DataError(f"{origin}: field {col!r} must be a string, got {type(value).__name__}")
    return value


def to_conversation(origin: str, rec: dict, source: DataSource, system_prompt: str | None = None,
                    response_required: bool = True) -> Conversation:
    if not isinstance(rec, dict):
        raise DataError(f"{origin}: expected an object, got {type(rec).__name__}")
    fmt = _detect_format(rec, source)
    system = _text(rec, _column(rec, source, "system"), origin, "system", required=False) or system_prompt
    head = [{"role": "system", "content": system}] if system else []
    if fmt == "messages":
        if source.template:
            raise DataError(f"{origin}: a template builds the user message from fields; it does not "
                            f"apply to chat 'messages' records")
        msgs = rec.get(_column(rec, source, "messages") or "messages")
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{origin}: 'messages' must be a non-empty list")
        clean = []
        for m in msgs:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), str):
                raise DataError(f"{origin}: each message needs role in system/user/assistant and "
                                f"a string content, got {m!r}")
            clean.append({"role": m["role"], "content": m["content"]})
        if clean[-1]["role"] != "assistant":
            raise DataError(f"{origin}: the last message must be the assistant's response")
        if clean[0]["role"] != "system":
            clean = head + clean
        return Conversation(tuple(clean[:-1]), clean[-1]["content"], origin, rec)
    if source.template and "prompt" not in templates.placeholders(source.template):
        user = None  # the template names the record's fields itself
    elif fmt == "instruction":
        instruction = _text(rec, _column(rec, source, "instruction"), origin, "instruction")
        context = _text(rec, _column(rec, source, "context"), origin, "context", required=False)
        user = f"{instruction}\n\n{context}" if context else instruction
    elif fmt == "prompt_response":
        user = _text(rec, _column(rec, source, "prompt"), origin, "prompt")
    else:
        raise DataError(f"{origin}: cannot tell the record's format from its keys {sorted(rec)}; "
                        f"set format (instruction | prompt_response | messages) and fields")
    if source.template:
        user = templates.render(source.template, rec, origin, user)
    response = _text(rec, _column(rec, source, "response"), origin, "response", required=response_required)
    prefix = _text(rec, _column(rec, source, "response_prefix"), origin, "response_prefix", required=False)
    return Conversation(tuple(head + [{"role": "user", "content": user}]), response, origin, rec,
                        response_prefix=prefix or "")


def load_conversations(source: DataSource, system_prompt: str | None = None) -> list[Conversation]:
    return [to_conversation(o, r, source, system_prompt) for o, r in read_records(source)]


def load_prompts(source: DataSource, system_prompt: str | None = None) -> list[Conversation]:
    """Prompt sets for evaluation: like conversations, but the response (target) is optional
    unless the records are chat messages (whose last message is the response)."""
    out = []
    for origin, rec in read_records(source):
        no_response = _detect_format(rec, source) != "messages" and _column(rec, source, "response") is None
        conv = to_conversation(origin, rec, source, system_prompt, response_required=not no_response)
        out.append(dataclasses.replace(conv, response=conv.response or ""))
    return out


# ---------------------------------------------------------------------------------------------
# Tokenisation with response-only labels

ALPACA_PROMPT = "### Instruction:\n{user}\n\n### Response:\n"


def render_prompt(tokenizer, messages) -> str:
    """The text the model sees before its response: the chat template if the tokenizer has one."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    system = "".join(m["content"] + "\n\n" for m in messages if m["role"] == "system")
    user = "\n\n".join(m["content"] for m in messages if m["role"] == "user")
    return system + ALPACA_PROMPT.format(user=user)


def completion_text(tokenizer, messages, response: str) -> str:
    """The text after the prompt that the loss is taken on (response and end of turn)."""
    if tokenizer.chat_template:
        prompt = render_prompt(tokenizer, messages)
        full = tokenizer.apply_chat_template(list(messages) + [{"role": "assistant", "content": response}],
                                             tokenize=False)
        if not full.startswith(prompt):
            raise DataError("the tokenizer's chat template renders the prompt differently with and "
                            "without the response, so the response tokens cannot be located")
        return full[len(prompt):]
    return response + (tokenizer.eos_token or "")


def _prefix_tokens(tokenizer, completion: str, prefix: str, origin: str) -> int:
    """How many leading completion tokens lie inside `prefix` (a token that straddles its end is
    learned: a prefix that ends at a word boundary has none)."""
    if not completion.startswith(prefix):
        raise DataError(f"{origin}: the response_prefix is not where the response starts in the rendered "
                        f"turn (the chat template changes it)")
    if not tokenizer.is_fast:
        raise DataError(f"{origin}: response_prefix needs a fast tokenizer (offsets locate the prefix)")
    offsets = tokenizer(completion, add_special_tokens=False, return_offsets_mapping=True).offset_mapping
    return sum(1 for _, end in offsets if end <= len(prefix))


def encode(tokenizer, conv: Conversation, max_length: int) -> dict[str, list[int]]:
    """input_ids and labels, labels masked (-100) on every prompt token and on the response
    prefix, if the record has one."""
    prompt_ids = tokenizer(render_prompt(tokenizer, conv.messages), add_special_tokens=False).input_ids
    if tokenizer.bos_token_id is not None and tokenizer.chat_template is None:
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    completion = completion_text(tokenizer, conv.messages, conv.response_prefix + conv.response)
    answer_ids = tokenizer(completion, add_special_tokens=False).input_ids
    fixed = _prefix_tokens(tokenizer, completion, conv.response_prefix, conv.origin) if conv.response_prefix else 0
    ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([IGNORE_INDEX] * (len(prompt_ids) + fixed) + answer_ids[fixed:])[:max_length]
    return {"input_ids": ids, "labels": labels}


def encode_all(tokenizer, convs: list[Conversation], max_length: int) -> list[dict[str, list[int]]]:
    """Encodes and drops examples whose response was truncated away entirely (no loss tokens)."""
    out = [encode(tokenizer, c, max_length) for c in convs]
    return [e for e in out if any(t != IGNORE_INDEX for t in e["labels"])]


def collate(examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


# ---------------------------------------------------------------------------------------------
# Deterministic, resumable batch order


class StepSampler:
    """Which examples each rank reads at each optimizer step.

    The order is an endless concatenation of per-epoch permutations seeded by (seed, epoch), so
    the examples of step t depend on t alone: resuming needs only the step counter, and a
    global batch holds the same examples whatever the world size (rank r takes micro-batches
    r, r + world, ... of it), so 1-rank and N-rank runs see the same data.
    """

    def __init__(self, num_examples: int, micro_batch: int, grad_accum: int, world: int, seed: int):
        self.n, self.micro, self.accum, self.world, self.seed = num_examples, micro_batch, grad_accum, world, seed
        self.global_batch = micro_batch * grad_accum * world
        if num_examples < self.global_batch:
            raise DataError(f"{num_examples} examples are fewer than one global batch "
                            f"({micro_batch} x {grad_accum} x {world} ranks)")

    def _stream(self, start: int, count: int) -> list[int]:
        out, epoch = [], start // self.n
        pos = start - epoch * self.n
        while len(out) < count:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
            out += perm[pos:]
            epoch, pos = epoch + 1, 0
        return out[:count]

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        batch = self._stream(step * self.global_batch, self.global_batch)
        chunks = [batch[i:i + self.micro] for i in range(0, len(batch), self.micro)]
        return chunks[rank::self.world]

    def steps_per_epoch(self) -> int:
        return max(1, self.n // self.global_batch)
