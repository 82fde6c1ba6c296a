"""Prompt templates: one rendering rule for training sources (`data.*.template`) and for
evaluation (`eval.task_prompt_template`).

A template is a Python format string whose placeholders name record fields (`{sentence}`) or
`{prompt}`, the prompt text the source's format reads from the record (instruction and context,
or the prompt column). Literal braces are written `{{` and `}}`.
"""

from __future__ import annotations

import string

from safebasin.safety_core.train.errors import DataError


def placeholders(template: str) -> list[str]:
    """The field names a template uses, in order; a malformed template is a DataError."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise DataError(f"template {template!r}: {e} (write literal braces as {{{{ and }}}})") from None
    names = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier():
            raise DataError(f"template {template!r}: placeholder {{{name}}} must be a plain field name "
                                f"(no indexing, attributes or positional fields)")
        if spec or conversion:
            raise DataError(f"template {template!r}: placeholder {{{name}}} takes no format spec or conversion")
        names.append(name)
    if not names:
        raise DataError(f"template {template!r} has no placeholder; use {{prompt}} or a record field such as {{sentence}}")
    return names


def render(template: str, record: dict, origin: str, prompt: str | None = None) -> str:
    """The template filled from `record` (and `prompt`), each value's surrounding whitespace
    trimmed; a missing or empty field names the record's origin and the fields it has."""
    values = {}
    for name in placeholders(template):
        # {prompt} is what the source's format reads as the prompt (it honours `fields`).
        value = prompt if name == "prompt" and prompt is not None else record.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            have = sorted(k for k in record if k != "prompt") + (["prompt"] if prompt is not None else [])
            raise DataError(f"{origin}: template field {{{name}}} is missing or empty; the record has {have}")
        if isinstance(value, (dict, list)):
            raise DataError(f"{origin}: template field {{{name}}} is a {type(value).__name__}, not text")
        values[name] = str(value).strip() if isinstance(value, str) else str(value)
    return template.format(**values)
