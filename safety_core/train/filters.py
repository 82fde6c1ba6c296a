"""Record filters (`filter: {field: value, ...}` on a data source): keep a record when each
named field equals the value, or one of a list of values."""

from __future__ import annotations

import json

from safebasin.safety_core.train.errors import DataError


def matches(rec: dict, wanted: dict, origin: str) -> bool:
    """Whether the record passes; a record without a filtered field is an error naming it (a
    misspelt field would otherwise drop every record silently)."""
    if not isinstance(rec, dict):
        raise DataError(f"{origin}: expected an object, got {type(rec).__name__}")
    for field, allowed in wanted.items():
        if field not in rec:
            raise DataError(f"{origin}: filter field {field!r} is not in the record (it has {sorted(rec)})")
        if not any(equal(rec[field], a) for a in (allowed if isinstance(allowed, list) else [allowed])):
            return False
    return True


def equal(value, wanted) -> bool:
    """Equality, where a CSV cell (always text) matches the YAML scalar it spells ('False' is
    false, '0' is 0), and a boolean matches only a boolean (true is not 1)."""
    if isinstance(value, str) and not isinstance(wanted, str):
        spelled = "null" if wanted is None else json.dumps(wanted)
        return value.strip().casefold() == spelled.casefold() or value.strip() == str(wanted)
    if isinstance(value, bool) or isinstance(wanted, bool):
        return value is wanted
    return value == wanted
