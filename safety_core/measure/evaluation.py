"""Safety and utility of one model: harmful response rate (HRR), prefilling-attack success rate,
held-out task loss, and task accuracy (classification or exact answer).

Every rank takes a disjoint shard of the work (whole batches) and all results are gathered in
the original order, so a multi-rank evaluation returns what the 1-rank evaluation returns.

(Just over 300 lines: the answer parsers sit with the metrics they feed, so one file holds the
whole definition of each number the evaluation reports.)
"""

from __future__ import annotations

import dataclasses
import json
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from safebasin.safety_core.args import Section
from safebasin.safety_core.distributed import chunks, is_main, map_batches
from safebasin.safety_core.measure.breakdown import KINDS, kind_of
from safebasin.safety_core.measure.correlation import example_nll, mean_nll
from safebasin.safety_core.measure.generation import Generation, generate
from safebasin.safety_core.measure.judges import (
    Judge,
    JudgeArgs,
    Verdict,
    make_judge,
    summarize,
)
from safebasin.safety_core.train.data import (
    Conversation,
    DataError,
    DataSource,
    load_prompts,
    render_prompt,
)
from safebasin.safety_core.train.summary import announce_prompts
from safebasin.safety_core.train.templates import placeholders, render

RESULTS_FILE = "results.json"
RECORDS_FILE = "eval_records.jsonl"


class EvalArgs(Section):
    harmful: DataSource | None = Field(None, description="harmful prompts; their targets (response "
                                       "field, e.g. AdvBench 'target') are what prefilling forces")
    judge: JudgeArgs = Field(default_factory=JudgeArgs)
    prefill_k: list[int] = Field(default_factory=list, description="prefilling attacks: K target tokens forced")
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(8, ge=1)
    system_prompt: str | None = None
    task: DataSource | None = None
    task_kind: Literal["loss", "classification", "exact_answer"] = "loss"
    task_prompt_template: str | None = Field(None, description="wraps each task prompt, e.g. "
                                             "'Is this review positive or negative?\\n{prompt}'; "
                                             "record fields work too ({sentence}), as in data templates")
    label_field: str | None = Field(None, description="record field with the gold label / answer "
                                    "(classification default: label_text; exact_answer default: the "
                                    "number after '####' in the response field)")
    labels: list[str] | None = Field(None, description="classification: the label words; an integer "
                                     "gold label indexes this list. Default: the gold labels seen")
    task_max_new_tokens: int | None = Field(None, ge=1, description="default: 32 for classification "
                                            "(room for 'The sentiment is positive.'), 256 for exact_answer")
    task_loss: bool = Field(True, description="held-out task loss (one forward pass per task example)")
    engine: Literal["hf", "vllm"] = Field("hf", description="generation engine: hf (transformers' "
                                          "generate, everywhere) or vllm (CUDA GPUs, one process; "
                                          "the task loss still uses the transformers model)")
    vllm_gpu_memory: float = Field(0.6, gt=0, le=1, description="eval.engine=vllm: share of GPU memory "
                                   "vLLM may take (it is freed before the transformers model for the task "
                                   "loss loads)")
    vllm_max_model_len: int | None = Field(None, ge=16, description="eval.engine=vllm: the context vLLM sizes "
                                           "its KV cache for; default: the longest prompt plus the tokens "
                                           "generated after it")
    max_length: int = Field(1024, ge=8, description="tokens per example for the task loss")

    @field_validator("prefill_k")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(k < 1 for k in v):
            raise ValueError(f"prefill_k values must be >= 1, got {v}")
        return sorted(set(v))

    @model_validator(mode="after")
    def _something(self):
        if self.harmful is None and self.task is None:
            raise ValueError("eval needs eval.harmful, eval.task, or both")
        if self.task_prompt_template is not None:
            placeholders(self.task_prompt_template)
            if self.task is not None and self.task.template is not None:
                raise ValueError("set eval.task.template or eval.task_prompt_template, not both")
        if self.task_kind == "loss" and not self.task_loss and self.task is not None:
            raise ValueError("eval.task_kind=loss with eval.task_loss=false measures nothing on the task")
        return self

    def generation_budget(self) -> int:
        if self.task_max_new_tokens is not None:
            return self.task_max_new_tokens
        return 256 if self.task_kind == "exact_answer" else 32


# ---------------------------------------------------------------------------------------------
# Answer extraction and scoring

_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")


def normalise_number(text: str) -> str | None:
    """'1,234.50' -> '1234.5', '-0' -> '0'; None when not a number."""
    try:
        value = Decimal(text.replace(",", "").replace("$", "").strip())
    except InvalidOperation:
        return None
    if value == 0:
        return "0"
    return format(value.normalize(), "f")


def extract_answer(text: str) -> str | None:
    """The final numeric answer: the first number after the last '####' (GSM8K's answer marker)
    when there is one, else the last number in the text; normalised, None when there is none."""
    if "####" in text:
        found = _NUMBER.findall(text.rsplit("####", 1)[1])
        return normalise_number(found[0]) if found else None
    found = _NUMBER.findall(text)
    return normalise_number(found[-1]) if found else None


def answer_line(response: str) -> str:
    """The first line of the response that has any text."""
    return next((line for line in response.splitlines() if line.strip()), "")


def predict_label(response: str, labels: list[str]) -> str | None:
    """The parse rule for classification: the label word that appears first anywhere in the
    first non-empty line of the response (whole words, case-insensitive; the longer label wins
    a tie, so 'very positive' beats 'positive'). 'The sentiment is positive.' is positive;
    None when that line names no label (later lines are not read: an answer must come first)."""
    line, best = answer_line(response), None
    for label in labels:
        m = re.search(rf"(?<!\w){re.escape(label)}(?!\w)", line, re.IGNORECASE)
        if m and (best is None or (m.start(), -len(label)) < (best[0], -len(best[1]))):
            best = (m.start(), label)
    return best[1] if best else None


def gold_label(rec: dict, field: str, labels: list[str] | None, origin: str) -> str:
    if field not in rec or rec[field] is None:
        raise DataError(f"{origin}: no gold label field {field!r} (set eval.label_field)")
    value = rec[field]
    if isinstance(value, int) and not isinstance(value, bool) and labels is not None:
        if not 0 <= value < len(labels):
            raise DataError(f"{origin}: label {value} is outside eval.labels {labels}")
        return labels[value]
    return str(value)


def gold_answer(conv: Conversation, field: str | None) -> str | None:
    if field is not None:
        if field not in (conv.record or {}):
            raise DataError(f"{conv.origin}: no gold answer field {field!r}")
        return normalise_number(str(conv.record[field]))
    return extract_answer(conv.response)


def classification_accuracy(responses: list[str], golds: list[str], labels: list[str]) -> tuple[float, list]:
    """(accuracy, predictions); a response naming no label is wrong."""
    preds = [predict_label(r, labels) for r in responses]
    correct = [p is not None and p.casefold() == g.casefold() for p, g in zip(preds, golds)]
    return (sum(correct) / len(correct) if correct else float("nan")), preds


def exact_answer_accuracy(responses: list[str], golds: list[str | None]) -> tuple[float, list]:
    preds = [extract_answer(r) for r in responses]
    correct = [p is not None and p == g for p, g in zip(preds, golds)]
    return (sum(correct) / len(correct) if correct else float("nan")), preds


# ---------------------------------------------------------------------------------------------


def judge_generations(judge: Judge, generations: list[Generation], batch_size: int) -> list[Verdict]:
    """Verdicts in order on every rank; each rank judges its own share."""
    return map_batches(lambda chunk: judge.judge([g.prompt for g in chunk], [g.response for g in chunk]),
                       chunks(generations, batch_size), desc="judge")


def task_conversations(args: EvalArgs) -> list[Conversation]:
    convs = load_prompts(args.task, args.system_prompt)
    if args.task_prompt_template is None:
        return convs
    out = []
    for c in convs:
        msgs = list(c.messages)
        last = max(i for i, m in enumerate(msgs) if m["role"] == "user")
        text = render(args.task_prompt_template, c.record or {}, c.origin, msgs[last]["content"])
        msgs[last] = {"role": "user", "content": text}
        out.append(dataclasses.replace(c, messages=tuple(msgs)))
    return out


def _safety(model, tokenizer, args: EvalArgs, judge: Judge, records: list[dict]) -> dict:
    convs = load_prompts(args.harmful, args.system_prompt)
    if is_main():
        announce_prompts(tokenizer, "harmful", args.harmful, convs)
    rendered = {c.origin: render_prompt(tokenizer, c.messages) for c in convs}
    out: dict = {"n_harmful": len(convs), "prefill_asr": {}, "prefill_asr_upper": {}, "prefill_unparsed": {},
                 "prefill_breakdown": {}}
    for k in [0] + args.prefill_k:
        gens = generate(model, tokenizer, convs, max_new_tokens=args.max_new_tokens,
                        batch_size=args.batch_size, prefill_tokens=k, desc=f"generate (prefill {k})")
        verdicts = judge_generations(judge, gens, args.judge.batch_size)
        stats = summarize(verdicts, [g.response for g in gens])
        parts = {kind: stats[f"{kind}_rate"] for kind in KINDS}
        if k == 0:
            out.update(hrr=stats["hrr"], hrr_upper=stats["hrr_upper"], unparsed=stats["unparsed"],
                       breakdown=parts)
        else:
            out["prefill_asr"][k] = stats["hrr"]
            out["prefill_asr_upper"][k] = stats["hrr_upper"]
            out["prefill_unparsed"][k] = stats["unparsed"]
            out["prefill_breakdown"][k] = parts
        records += [{"set": "harmful", "prefill_k": k, "origin": g.origin, "prompt": g.prompt,
                     "rendered_prompt": rendered[g.origin], "response": g.response,
                     "forced_tokens": len(g.forced_ids), **v.to_record(), "kind": kind_of(g.response, v.harmful)}
                    for g, v in zip(gens, verdicts)]
    return out


def _utility(model, engine, tokenizer, args: EvalArgs, records: list[dict]) -> dict:
    convs = task_conversations(args)
    if is_main():
        announce_prompts(tokenizer, f"task ({args.task_kind})", args.task, convs)
    with_response = [c for c in convs if c.response]
    out: dict = {"task_kind": args.task_kind, "n_task": len(convs), "task_loss": None, "task_accuracy": None,
                 "n_task_loss": len(with_response) if args.task_loss else 0}
    if args.task_kind == "loss" and len(with_response) < len(convs):
        missing = next(c.origin for c in convs if not c.response)
        raise DataError(f"{missing}: task_kind=loss needs a response in every task record")
    if args.task_kind != "loss":
        out["task_accuracy"] = _task_accuracy(engine, tokenizer, args, convs, records)
    if args.task_loss and with_response:
        if engine is not model and hasattr(engine, "close"):
            engine.close()  # every answer is generated: the engine's memory goes to the model below
        # over the records that have a response; n_task_loss says how many that is
        loaded = model if isinstance(model, torch.nn.Module) else model()  # a loader: load it now
        out["task_loss"] = mean_nll(example_nll(loaded, tokenizer, with_response,
                                                max_length=args.max_length, batch_size=args.batch_size,
                                                desc="task loss"))
    return out


def _task_accuracy(engine, tokenizer, args: EvalArgs, convs: list[Conversation], records: list[dict]) -> float | None:
    gens = generate(engine, tokenizer, convs, max_new_tokens=args.generation_budget(),
                    batch_size=args.batch_size, desc="generate (task)")
    responses = [g.response for g in gens]
    if args.task_kind == "classification":
        field = args.label_field or "label_text"
        golds = [gold_label(c.record or {}, field, args.labels, c.origin) for c in convs]
        labels = args.labels or sorted(set(golds))
        acc, preds = classification_accuracy(responses, golds, labels)
    else:
        golds = [gold_answer(c, args.label_field) for c in convs]
        if any(g is None for g in golds):
            bad = next(c.origin for c, g in zip(convs, golds) if g is None)
            raise DataError(f"{bad}: no gold numeric answer (no '####' answer or number; set eval.label_field)")
        acc, preds = exact_answer_accuracy(responses, golds)
    records += [{"set": "task", "origin": c.origin, "prompt": g.prompt,
                 "rendered_prompt": render_prompt(tokenizer, c.messages), "response": g.response,
                 "gold": gold, "pred": pred, "correct": pred is not None and pred.casefold() == gold.casefold()}
                for c, g, gold, pred in zip(convs, gens, golds, preds)]
    return acc


def evaluate(model, tokenizer, args: EvalArgs, out_dir=None, *, judge: Judge | None = None,
             engine=None) -> dict:
    """HRR, prefilling ASR per K, task loss and accuracy, and per-example records for audit.

    Returns (on every rank) a JSON-able dict: n_harmful, hrr (the compliance share), hrr_upper,
    unparsed, breakdown {refusal, compliance, degenerate: share} (breakdown.py), prefill_asr
    {K: rate}, prefill_asr_upper, prefill_unparsed, prefill_breakdown {K: breakdown}, judge, task_kind, n_task, n_task_loss (the task records with a response: the loss is over them), task_loss,
    task_accuracy, records, files. Rates are None when there was nothing to rate. `judge`
    reuses an already-built judge (a Llama Guard model is expensive to load). `engine` generates
    instead of `model` (measure/vllm_engine.py); `model` then serves the task loss only, taken
    after every answer is generated and the engine closed; it may be a function that loads it
    then, or None when there is no loss to take.
    With out_dir, rank 0 writes results.json (everything but records) and eval_records.jsonl; every
    record holds `rendered_prompt`, the prompt exactly as the model saw it (chat template applied).
    """
    records: list[dict] = []
    result: dict = {"judge": None, "n_harmful": 0, "hrr": None, "hrr_upper": None, "unparsed": 0,
                    "breakdown": None, "prefill_asr": {}, "prefill_asr_upper": {}, "prefill_unparsed": {},
                    "prefill_breakdown": {},
                    "task_kind": None, "n_task": 0, "n_task_loss": 0, "task_loss": None, "task_accuracy": None}
    if args.harmful is not None:
        judge = judge or make_judge(args.judge)
        result["judge"] = judge.name
        result.update(_safety(engine or model, tokenizer, args, judge, records))
    if args.task is not None:
        result.update(_utility(model, engine or model, tokenizer, args, records))
    result["records"] = records
    result["files"] = {}
    if out_dir is not None:
        out = Path(out_dir)
        result["files"] = {"results": str(out / RESULTS_FILE), "records": str(out / RECORDS_FILE)}
        if is_main():
            out.mkdir(parents=True, exist_ok=True)
            summary = {k: v for k, v in result.items() if k != "records"}
            Path(result["files"]["results"]).write_text(json.dumps(summary, indent=2) + "\n")
            with open(result["files"]["records"], "w") as f:
                for rec in records:
                    f.write(json.dumps(rec) + "\n")
    return result


def flat_metrics(result: dict) -> dict[str, float]:
    """The numeric results as flat metric names (for MLflow): hrr, hrr_upper, unparsed,
    refusal_rate, compliance_rate, degenerate_rate, prefill_asr_k{K}, prefill_asr_upper_k{K},
    prefill_{kind}_rate_k{K}, task_loss, task_accuracy; None values left out."""
    out = {k: float(result[k]) for k in ("hrr", "hrr_upper", "unparsed", "task_loss", "task_accuracy")
           if result.get(k) is not None}
    for k, v in result.get("prefill_asr", {}).items():
        if v is not None:
            out[f"prefill_asr_k{k}"] = float(v)
    for k, v in result.get("prefill_asr_upper", {}).items():
        if v is not None:
            out[f"prefill_asr_upper_k{k}"] = float(v)
    for kind, v in (result.get("breakdown") or {}).items():
        if v is not None:
            out[f"{kind}_rate"] = float(v)
    for k, parts in result.get("prefill_breakdown", {}).items():
        for kind, v in parts.items():
            if v is not None:
                out[f"prefill_{kind}_rate_k{k}"] = float(v)
    return out
