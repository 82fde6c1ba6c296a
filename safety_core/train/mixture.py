"""The fine-tuning set: one source or a weighted mixture of sources, plus the harmful mix (the
attack setting), drawn deterministically from `data.seed`, with a report of what was realised.

Mixture rule (data.train as a list): a source with `count` gives exactly that many examples; the
sources with `weight` share the rest of `data.num_examples` in proportion to their weights
(largest remainders, so the counts add up exactly); without num_examples they give the largest
set the weighted sources can supply at those proportions. With neither weight nor count on any
source, the sources are pooled (each weighted by its size). Each source is sampled without
replacement by its own seeded generator, and the result is shuffled by data.seed.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from safebasin.safety_core.train.data import (
    Conversation,
    DataArgs,
    DataError,
    DataSource,
    MixtureSource,
    read_source,
    to_conversation,
)


@dataclass
class SourceReport:
    name: str
    path: str
    harmful: bool
    available: int        # records after the filter (and limit)
    filtered_out: int     # records the filter dropped
    taken: int = 0


@dataclass
class MixReport:
    sources: list[SourceReport] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"sources": [dataclasses.asdict(s) for s in self.sources],
                "examples": sum(s.taken for s in self.sources),
                "harmful": sum(s.taken for s in self.sources if s.harmful),
                "benign": sum(s.taken for s in self.sources if not s.harmful)}


def source_name(source: DataSource) -> str:
    if getattr(source, "name", None):
        return source.name
    return source.path if source.path.startswith("builtin:") else Path(source.path).stem or source.path


def _load(source: DataSource, system_prompt: str | None, harmful: bool) -> tuple[list[Conversation], SourceReport]:
    rows, dropped = read_source(source)
    name = source_name(source)
    convs = [dataclasses.replace(to_conversation(o, r, source, system_prompt), source=name, harmful=harmful)
             for o, r in rows]
    return convs, SourceReport(name, source.path, harmful, len(convs), dropped)


def apportion(total: int, weights: list[float]) -> list[int]:
    """Integer shares of `total` proportional to `weights` (largest remainders; ties to the
    earlier source), summing to `total` exactly."""
    scale = total / sum(weights)
    exact = [w * scale for w in weights]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def mixture_counts(sizes: list[int], sources: list[MixtureSource], target: int | None,
                   names: list[str]) -> list[int]:
    """How many examples each source gives (see the module docstring for the rule)."""
    weighted = [s.weight is not None for s in sources]
    plain = [s.weight is None and s.count is None for s in sources]
    if any(weighted) and any(plain):
        bad = [n for n, p in zip(names, plain) if p]
        raise DataError(f"data.train: source(s) {bad} have neither weight nor count while others have a "
                        f"weight; give every source a weight or a count")
    counts = [s.count or 0 for s in sources]
    for n, c, size in zip(names, counts, sizes):
        if c > size:
            raise DataError(f"data.train source {n!r}: count {c} but it has {size} records (after filter/limit)")
    fixed = sum(counts)
    shares = [s.weight for s in sources] if any(weighted) else [float(z) if p else 0.0 for z, p in zip(sizes, plain)]
    idx = [i for i, w in enumerate(shares) if w]
    if target is not None and target < fixed:
        raise DataError(f"data.train: the counts add up to {fixed}, more than the {target} examples asked for")
    if not idx:
        if target is not None and target != fixed:
            raise DataError(f"data.train: the counts add up to {fixed} but {target} examples are asked for; "
                            f"give some source a weight, or make the counts add up")
        return counts
    if target is None:
        # The largest set the weighted sources supply at their proportions.
        total_w = sum(shares[i] for i in idx)
        rest = min(math.floor(sizes[i] * total_w / shares[i] + 1e-9) for i in idx)
        while any(c > sizes[i] for i, c in zip(idx, apportion(rest, [shares[i] for i in idx]))):
            rest -= 1
    else:
        rest = target - fixed
    for i, c in zip(idx, apportion(rest, [shares[i] for i in idx])):
        if c > sizes[i]:
            raise DataError(f"data.train source {names[i]!r}: its share is {c} examples but it has "
                            f"{sizes[i]} records (after filter/limit)")
        counts[i] = c
    return counts


def _sample(convs: list[Conversation], k: int, seed: int, salt: str) -> list[Conversation]:
    # A generator per source: adding a source does not change what the others draw.
    return random.Random(f"{seed}:{salt}").sample(convs, k)


def training_set_with_report(args: DataArgs) -> tuple[list[Conversation], MixReport]:
    """The fine-tuning set and what was realised per source."""
    report = MixReport()
    n_harm = 0
    if args.harmful_mix is not None and args.num_examples is not None:
        n_harm = round(args.harmful_mix.fraction * args.num_examples)
    task_target = None if args.num_examples is None else args.num_examples - n_harm

    sources = args.train if isinstance(args.train, list) else [args.train]
    if len(sources) > 1 or sources[0].weight is not None or sources[0].count is not None:
        loaded = [_load(s, args.system_prompt, False) for s in sources]
        names = [r.name for _, r in loaded]
        shared = sorted(n for n in set(names) if names.count(n) > 1)
        if shared:
            raise DataError(f"data.train: two sources share the name {shared[0]!r}; set name: on one of them")
        counts = mixture_counts([len(c) for c, _ in loaded], sources, task_target, names)
        task = []
        for (convs, rep), k, i in zip(loaded, counts, range(len(loaded))):
            task += _sample(convs, k, args.seed, f"train{i}")
            report.sources.append(rep)
        random.Random(args.seed).shuffle(task)
    else:
        # One plain source: drawn exactly as before mixtures existed.
        task, rep = _load(sources[0], args.system_prompt, False)
        report.sources.append(rep)
        if args.harmful_mix is None and args.num_examples is not None:
            if args.num_examples > len(task):
                raise DataError(f"data.num_examples={args.num_examples} but {sources[0].path} has "
                                f"{len(task)} records")
            task = random.Random(args.seed).sample(task, args.num_examples)

    if args.harmful_mix is not None:
        harmful, rep = _load(args.harmful_mix.source, args.system_prompt, True)
        report.sources.append(rep)
        n = args.num_examples or len(task)
        task = harmful_mix(task, harmful, n, args.harmful_mix.fraction, args.seed)
    for rep in report.sources:
        rep.taken = sum(1 for c in task if c.source == rep.name and c.harmful == rep.harmful)
    return task, report


def training_set(args: DataArgs) -> list[Conversation]:
    return training_set_with_report(args)[0]


def harmful_mix(task: list[Conversation], harmful: list[Conversation], n: int, fraction: float,
                seed: int) -> list[Conversation]:
    """n examples of which round(fraction * n) come from `harmful`, shuffled by seed."""
    n_harm = round(fraction * n)
    n_task = n - n_harm
    if n_task > len(task) or n_harm > len(harmful):
        raise DataError(f"harmful mix needs {n_task} task and {n_harm} harmful examples; "
                        f"the sources have {len(task)} and {len(harmful)}")
    rng = random.Random(seed)
    mixed = rng.sample(task, n_task) + rng.sample(harmful, n_harm)
    rng.shuffle(mixed)
    return mixed
