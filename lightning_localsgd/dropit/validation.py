"""DropIT's argument checks: fail before anything is swapped, naming the argument and the value."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def check_gamma(gamma: Any) -> float:
    """The fraction of each input dropped: strictly between 0 (keep all: use the plain layer) and 1."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma):
        raise ValueError(f"`gamma` must be a number in (0, 1), got {gamma!r}.")
    if not 0 < gamma < 1:
        raise ValueError(f"`gamma` must be in (0, 1) (the fraction of each layer input dropped), got {gamma}.")
    return float(gamma)


def check_skip(skip: Any) -> tuple[str, ...]:
    """Qualified module names: a list of non-empty strings (a lone string would be read letter by letter)."""
    if isinstance(skip, str):
        raise ValueError(f"`skip` must be a list of module names, got the string {skip!r}; did you mean [{skip!r}]?")
    if not isinstance(skip, Sequence):
        raise ValueError(f"`skip` must be a list of module names, got {skip!r} ({type(skip).__name__}).")
    for name in skip:
        if not isinstance(name, str) or not name:
            raise ValueError(f"`skip` entries must be non-empty module names, got {name!r} in {list(skip)!r}.")
    return tuple(skip)
