"""A stage's numbers from one evaluation: the standard names an eval section measures, and their
values read from an `eval` job's summary (its results.json). May import nothing of the project.

Standard numbers: hrr (compliance share), refusal, degenerate (empty or looping answers, never
counted safe) when there are harmful prompts; prefill_asr and prefill_degenerate for one
prefill K (prefill_asr_k{K}, prefill_degenerate_k{K} for several); task_accuracy for a
classification or exact-answer task; task_loss unless eval.task_loss is false.
"""

from __future__ import annotations


def standard_names(eval_section: dict) -> list[str]:
    names = []
    if eval_section.get("harmful") is not None:
        names += ["hrr", "refusal", "degenerate"]
        ks = list(eval_section.get("prefill_k") or [])
        if len(ks) == 1:
            names += ["prefill_asr", "prefill_degenerate"]
        else:
            names += [f"prefill_{m}_k{k}" for k in ks for m in ("asr", "degenerate")]
    if eval_section.get("task") is not None:
        if eval_section.get("task_kind", "loss") != "loss":
            names.append("task_accuracy")
        if eval_section.get("task_loss", True):
            names.append("task_loss")
    return names


def names(eval_section: dict, renamed: dict[str, str] | None) -> list[str]:
    """The metric names a suite gives its stages."""
    return list(renamed) if renamed is not None else standard_names(eval_section)


def numbers(summary: dict, eval_section: dict, renamed: dict[str, str] | None) -> dict:
    """{name: value} of one evaluation (None where there was nothing to rate)."""
    parts = summary.get("breakdown") or {}
    ks = list(eval_section.get("prefill_k") or [])

    def at(table: dict, k):
        return (table or {}).get(str(k), (table or {}).get(k))
    values = {"hrr": summary.get("hrr"), "refusal": parts.get("refusal"), "degenerate": parts.get("degenerate"),
              "task_accuracy": summary.get("task_accuracy"), "task_loss": summary.get("task_loss")}
    for k in ks:
        asr, split = at(summary.get("prefill_asr"), k), at(summary.get("prefill_breakdown"), k) or {}
        values[f"prefill_asr_k{k}"], values[f"prefill_degenerate_k{k}"] = asr, split.get("degenerate")
        if len(ks) == 1:
            values["prefill_asr"], values["prefill_degenerate"] = asr, split.get("degenerate")
    wanted = renamed if renamed is not None else {n: n for n in standard_names(eval_section)}
    return {name: values.get(source) for name, source in wanted.items()}
