"""The data summary printed at the start of a training job and logged to MLflow: examples per
source and per harmful/benign split, records the filters dropped, token lengths (mean, p95,
max), what truncation at max_length cut, and one example rendered exactly as the model sees it.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

from safebasin.safety_core.nll import IGNORE_INDEX
from safebasin.safety_core.train import data as data_lib
from safebasin.safety_core.train.data import Conversation
from safebasin.safety_core.train.mixture import MixReport

SUMMARY_FILE = "data_summary.json"


def percentile(values: list[int], q: float) -> int:
    """Nearest-rank percentile (a value that occurs in the data)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def rendered_example(tokenizer, conv: Conversation) -> dict:
    """The prompt text after the chat template (system prompt and generation prompt included)
    and the completion the loss is taken on, as data.encode tokenizes them."""
    return {"origin": conv.origin, "source": conv.source, "harmful": conv.harmful,
            "prompt": data_lib.render_prompt(tokenizer, conv.messages),
            "response_prefix": conv.response_prefix,
            "completion": data_lib.completion_text(tokenizer, conv.messages, conv.response_prefix + conv.response)}


def data_summary(tokenizer, convs: list[Conversation], report: MixReport, max_length: int) -> dict:
    lengths, cut, no_loss = [], [], 0
    for conv in convs:
        full = data_lib.encode(tokenizer, conv, sys.maxsize)
        n = len(full["input_ids"])
        lengths.append(n)
        if n > max_length:
            cut.append(n - max_length)
            if all(t == IGNORE_INDEX for t in full["labels"][:max_length]):
                no_loss += 1
    out = report.to_dict()
    out.update(max_length=max_length, dropped_no_response_tokens=no_loss,
               filtered_out=sum(s.filtered_out for s in report.sources),
               tokens={"mean": sum(lengths) / len(lengths), "p95": percentile(lengths, 95), "max": max(lengths)}
               if lengths else {"mean": None, "p95": None, "max": None},
               truncated={"examples": len(cut), "tokens_cut_mean": sum(cut) / len(cut) if cut else 0.0,
                          "tokens_cut_max": max(cut, default=0)},
               example=rendered_example(tokenizer, convs[0]) if convs else None)
    return out


def format_summary(s: dict) -> str:
    lines = [f"data: {s['examples']} examples ({s['benign']} benign, {s['harmful']} harmful)"]
    for src in s["sources"]:
        dropped = f" ({src['filtered_out']} dropped by the filter)" if src["filtered_out"] else ""
        lines.append(f"  {'harmful' if src['harmful'] else 'benign '} {src['name']}: {src['taken']} taken of "
                     f"{src['available']} records{dropped} <- {src['path']}")
    t, tr = s["tokens"], s["truncated"]
    if t["mean"] is not None:
        lines.append(f"  tokens per example: mean {t['mean']:.1f}, p95 {t['p95']}, max {t['max']}; "
                     f"{tr['examples']} truncated at max_length {s['max_length']} (cut {tr['tokens_cut_mean']:.1f} "
                     f"tokens on average, at most {tr['tokens_cut_max']}); {s['dropped_no_response_tokens']} "
                     f"dropped with no response token left")
    if s["example"]:
        ex = s["example"]
        lines.append(f"  one example ({ex['origin']}), exactly as the model sees it; the loss is on the part after '>>> loss:'")
        lines.append(_indent(ex["prompt"]) + "\n  >>> loss:\n" + _indent(ex["completion"]))
    return "\n".join("[safebasin] " + line if i == 0 else line for i, line in enumerate(lines))


def _indent(text: str) -> str:
    return "\n".join("    | " + line for line in text.split("\n"))


def flat_metrics(s: dict) -> dict[str, float]:
    """MLflow metric names: data.examples, data.harmful, data.benign, data.filtered_out,
    data.tokens_mean/p95/max, data.truncated, data.truncated_tokens_mean/max,
    data.dropped_no_response_tokens, and per source data.examples.NAME, data.filtered_out.NAME."""
    out = {"data.examples": s["examples"], "data.harmful": s["harmful"], "data.benign": s["benign"],
           "data.filtered_out": s["filtered_out"], "data.truncated": s["truncated"]["examples"],
           "data.truncated_tokens_mean": s["truncated"]["tokens_cut_mean"],
           "data.truncated_tokens_max": s["truncated"]["tokens_cut_max"],
           "data.dropped_no_response_tokens": s["dropped_no_response_tokens"]}
    out.update({f"data.tokens_{k}": v for k, v in s["tokens"].items() if v is not None})
    for src in s["sources"]:
        name = re.sub(r"[^\w./ -]", "_", src["name"])
        out[f"data.examples.{name}"] = src["taken"]
        out[f"data.filtered_out.{name}"] = src["filtered_out"]
    return out


def report_data(tokenizer, convs: list[Conversation], report: MixReport, max_length: int, out_dir) -> dict:
    """Computes, prints and writes OUTPUT/data_summary.json; returns the summary."""
    summary = data_summary(tokenizer, convs, report, max_length)
    print(format_summary(summary), flush=True)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def announce_prompts(tokenizer, what: str, source, convs: list[Conversation]) -> None:
    """The evaluation side of the data summary: how many prompts a set has and the first one
    exactly as the model sees it (printed by rank 0 before generating)."""
    print(f"[safebasin] eval data: {what}: {len(convs)} prompts <- {source.path}", flush=True)
    if convs:
        print(f"  one prompt ({convs[0].origin}), exactly as the model sees it:\n"
              + _indent(data_lib.render_prompt(tokenizer, convs[0].messages)), flush=True)
