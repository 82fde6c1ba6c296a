"""Helpers shared by the Triton kernel modules. Importing this imports triton."""

from __future__ import annotations

import os

import triton


def _interpret_setting() -> bool:
    """TRITON_INTERPRET as Triton itself reads it: through triton.knobs (3.4+), or straight from
    the environment as @triton.jit does in 3.0-3.3 (the pyproject floor is 3.0)."""
    if hasattr(triton, "knobs"):
        return bool(triton.knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# @triton.jit decides at decoration time whether a kernel is compiled or interpreted, so what
# counts is the setting when the kernel modules (which import this one first) were imported.
INTERPRETED = _interpret_setting()

# tl.dot needs every block dimension to be at least 16.
MIN_DOT = 16


def pad(n: int, floor: int = MIN_DOT) -> int:
    """The power-of-two block size covering n (tl.arange needs powers of two)."""
    return max(floor, triton.next_power_of_2(max(int(n), 1)))

