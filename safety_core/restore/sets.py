"""The four disjoint data sets of restoration (D_forget, D_curv_forget, D_retain1, D_retain2),
split deterministically by seed and encoded with response-only labels."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from safebasin.safety_core.restore.config import RestoreArgs
from safebasin.safety_core.train import data as data_lib
from safebasin.safety_core.train.data import DataError, DataSource


@dataclass
class RestoreSets:
    forget: list[dict]
    curvature_forget: list[dict]
    retain1: list[dict]
    retain2: list[dict]
    # examples drawn for a set whose response max_length truncated away entirely (no loss token)
    dropped: dict[str, int] = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        sizes = {k: len(v) for k, v in self.__dict__.items() if k != "dropped"}
        return {**sizes, **{f"{k}_dropped": n for k, n in self.dropped.items()}}

    def curvature_sets(self, sources: str) -> list[list[dict]]:
        """The sets the curvature probes cycle over for restore.curvature_sources."""
        by_source = {"mixed": [self.curvature_forget, self.retain1, self.retain2],
                     "retain": [self.retain1, self.retain2],
                     "forget": [self.curvature_forget],
                     "none": []}
        if sources not in by_source:
            raise ValueError(f"restore.curvature_sources must be one of {sorted(by_source)}, got {sources!r}")
        return by_source[sources]


def _split(convs: list, sizes: list[int], names: list[str], source: DataSource, seed: int) -> list[list]:
    """Consecutive disjoint parts of one seeded shuffle of `convs`."""
    if sum(sizes) > len(convs):
        wanted = " + ".join(f"{n} {s}" for n, s in zip(names, sizes))
        raise DataError(f"restore: {source.path} has {len(convs)} records but {wanted} are asked for; "
                        f"lower the sizes (restore.*_size) or give a larger source")
    order = list(range(len(convs)))
    random.Random(seed).shuffle(order)
    parts, start = [], 0
    for size in sizes:
        parts.append([convs[i] for i in order[start:start + size]])
        start += size
    return parts


def build_sets(args: RestoreArgs, tokenizer) -> RestoreSets:
    forget_convs = data_lib.load_conversations(args.forget, args.system_prompt)
    if args.curvature_forget is None or args.curvature_forget == args.forget:
        forget, curv = _split(forget_convs, [args.forget_size, args.curvature_forget_size],
                              ["forget_size", "curvature_forget_size"], args.forget, args.seed)
    else:
        forget, = _split(forget_convs, [args.forget_size], ["forget_size"], args.forget, args.seed)
        curv, = _split(data_lib.load_conversations(args.curvature_forget, args.system_prompt),
                       [args.curvature_forget_size], ["curvature_forget_size"], args.curvature_forget,
                       args.seed)
    retain1, retain2 = _split(data_lib.load_conversations(args.retain, args.system_prompt),
                              [args.retain1_size, args.retain2_size], ["retain1_size", "retain2_size"],
                              args.retain, args.seed + 1)
    drawn = {"forget": forget, "curvature_forget": curv, "retain1": retain1, "retain2": retain2}
    encoded = {name: data_lib.encode_all(tokenizer, convs, args.max_length) for name, convs in drawn.items()}
    dropped = {name: len(drawn[name]) - len(ex) for name, ex in encoded.items()}
    # A set never shrinks unannounced: every drop is counted in the sizes, and a set that lost
    # more than max_dropped_share is refused with its numbers.
    shrunk = [f"{name}: {n} of {len(drawn[name])}" for name, n in dropped.items()
              if n > args.max_dropped_share * len(drawn[name])]
    if shrunk:
        raise DataError(f"restore: max_length={args.max_length} truncates the whole response of too many "
                        f"examples ({'; '.join(shrunk)}; restore.max_dropped_share={args.max_dropped_share}); "
                        f"raise restore.max_length or max_dropped_share")
    return RestoreSets(**encoded, dropped=dropped)


def batches(examples: list[dict], size: int) -> list[list[dict]]:
    return [examples[i:i + size] for i in range(0, len(examples), size)]
