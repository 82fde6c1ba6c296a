"""One line per fault of a schema's validation, naming the key; an unknown key with the keys
allowed there (and the closest one). The job config's launcher.config.describe does the same
for job configs; safety_core never imports the launcher, hence this one. Imports nothing of
the project.
"""

from __future__ import annotations

import difflib

from pydantic import BaseModel, ValidationError
from safebasin.safety_core.args import section_type


def describe(err: ValidationError, root: type[BaseModel]) -> list[str]:
    """One line per fault, naming the key; an unknown key with the keys allowed there."""
    problems = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith(("function-", "literal["))))
        key = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            owner = _owner(loc, root)
            allowed = sorted(f.alias or n for n, f in owner.model_fields.items()) if owner else []
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(f"{key}: unknown key; allowed here: {allowed}{hint}")
        elif e["type"] == "missing":
            problems.append(f"{key}: required")
        else:
            got = repr(e.get("input"))
            # a whole section as the input (a model validator's) would bury the message
            problems.append(f"{key}: {e['msg']}" + (f" (got {got})" if len(got) <= 200 else ""))
    return problems


def _owner(loc: tuple, root: type[BaseModel]) -> type[BaseModel] | None:
    """The schema class whose key is loc[-1] (a mapping of named entries skips the name)."""
    current: type[BaseModel] | None = root
    for part in loc[:-1]:
        if current is None:
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            continue  # the name of an entry in a mapping (stages.lora), or a list index
        current = section_type(field.annotation)
    return current
