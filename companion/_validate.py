"""Input checks shared by the package's public entry points (private module).

Every public function that validates its arguments uses these, so that a bad argument
always raises the same way: ``TypeError`` for a wrong type, ``ValueError`` for a wrong
value, and the message names the argument, what was expected and what was given.
Topic modules import from here, never from each other's private helpers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def check_type(name: str, value, expected: type | tuple[type, ...]) -> None:
    """Raise ``TypeError`` unless ``value`` is an instance of ``expected`` (bools are not ints)."""
    kinds = expected if isinstance(expected, tuple) else (expected,)
    if isinstance(value, bool) and bool not in kinds:
        ok = False
    else:
        ok = isinstance(value, kinds)
    if not ok:
        wanted = " or ".join(k.__name__ for k in kinds)
        raise TypeError(f"{name} must be {wanted}, got {type(value).__name__}")


def check_int(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """An ``int`` (not a ``bool``) with ``low <= value <= high`` where the bounds are given."""
    check_type(name, value, int)
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def check_float(name: str, value, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number (int or float, not bool) within the given (closed or open) bounds."""
    check_type(name, value, (int, float))
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")
    return value


def check_choice(name: str, value, choices: Iterable) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_tensor(name: str, value, *, ndim: int | None = None, floating: bool = False,
                 dtype: torch.dtype | None = None) -> torch.Tensor:
    """A ``torch.Tensor``, optionally of a given number of dimensions and dtype."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if dtype is not None and value.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {value.dtype}")
    return value
