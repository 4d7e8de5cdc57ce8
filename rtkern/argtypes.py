"""argparse ``type`` functions shared by the CLIs: values checked while parsing, so a bad flag is a usage
error (exit status 2) before any model loads. `positive_int` is the same kind of check for a value passed
from Python."""
from __future__ import annotations

import argparse
import math
from typing import Callable


def positive_int(value, name: str) -> int:
    """``value`` when it is an int >= 1 (not a bool); else ValueError naming ``name`` and the value."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An int >= ``minimum``."""
    def parse(text: str) -> int:
        v = _number(int, text, "an integer")
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {v}")
        return v
    return parse


def int64(text: str) -> int:
    """An int that fits in int64 (seeds)."""
    v = _number(int, text, "an integer")
    if not -2**63 <= v < 2**63:
        raise argparse.ArgumentTypeError(f"must fit in int64, got {v}")
    return v


def finite_float(minimum: float, *, strict: bool = False, note: str = "") -> Callable[[str], float]:
    """A finite float >= ``minimum`` (> with ``strict``); ``note`` is added to the error."""
    def parse(text: str) -> float:
        v = _number(float, text, "a number")
        if not math.isfinite(v) or v < minimum or (strict and v == minimum):
            raise argparse.ArgumentTypeError(f"must be finite and {'>' if strict else '>='} {minimum:g}{note}, "
                                             f"got {text!r}")
        return v
    return parse


def _number(kind, text: str, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
