"""Argument checks shared by algorithms and strategies: fail at construction, name the argument and the value."""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Iterable
from typing import Any


def check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value}.")
    return value


def check_positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{name}` must be a positive number, got {value!r} ({type(value).__name__}).")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be a positive finite number, got {value}.")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r} ({type(value).__name__}).")
    return value


def check_unit_interval(name: str, value: Any, include_one: bool = True) -> float:
    """A number in [0, 1] (or [0, 1) with ``include_one=False``)."""
    upper = "1]" if include_one else "1)"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a number in [0, {upper}, got {value!r}.")
    if value < 0 or value > 1 or (value == 1 and not include_one):
        raise ValueError(f"`{name}` must be in [0, {upper}, got {value}.")
    return float(value)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(repr(c) for c in choices)}; got {value!r}.")
    return value


def keyword_names(cls: type, stop: type) -> list[str]:
    """The keyword arguments ``cls(...)`` takes: its ``__init__``'s, then its parents' as far as ``**kwargs`` reaches
    them (stopping after ``stop``); ``algorithm`` counts only for ``stop`` itself (subclasses build their own)."""
    names: list[str] = []
    for owner in cls.__mro__:
        init = owner.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names += [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"]
        if owner is stop or not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    if cls is not stop and "algorithm" in names:
        names.remove("algorithm")
    return list(dict.fromkeys(names))


def unexpected_keywords_error(cls: type, unexpected: Iterable[str], accepted: list[str]) -> TypeError:
    """Python's error for an unknown keyword, but naming the class the user called and the closest valid names."""
    unexpected = list(unexpected)
    hints = []
    for name in unexpected:
        close = difflib.get_close_matches(name, accepted, n=1)
        hints.append(f"`{name}` (did you mean `{close[0]}`?)" if close else f"`{name}`")
    plural = "s" if len(unexpected) > 1 else ""
    return TypeError(
        f"{cls.__name__}() got unexpected keyword argument{plural} {', '.join(hints)}. It takes: {', '.join(accepted)}."
    )
