"""Helpers shared by the Triton kernel modules. Importing this imports triton."""

from __future__ import annotations

import triton
from triton import knobs

# @triton.jit decides at decoration time whether a kernel is compiled or interpreted, so what
# counts is the setting when the kernel modules (which import this one first) were imported.
INTERPRETED = bool(knobs.runtime.interpret)

# tl.dot needs every block dimension to be at least 16.
MIN_DOT = 16


def pad(n: int, floor: int = MIN_DOT) -> int:
    """The power-of-two block size covering n (tl.arange needs powers of two)."""
    return max(floor, triton.next_power_of_2(max(int(n), 1)))

