"""Claims that can fail: check a measured number against its bound, print both, glue it.

Every chapter states results in its prose ("the error stays below 1e-12", "the student
loses 0.3 nats less"). Each such sentence rests on a number computed beside it, and the
book keeps three things together for each one:

1. **a check that can fail**: the number must be finite and on the stated side of its
   bound, otherwise :class:`ClaimError` (an ``AssertionError``) stops the notebook;
2. **what was measured and by how much it holds**: one printed line,
   ``key = value  (claim: < bound, margin m)``, never a bare ``True``;
3. **the number the prose pastes**: :func:`claim` glues the value under ``key`` (MyST-NB's
   ``glue``) when it runs inside a notebook.

NaN is the trap this module exists for: ``x < tol`` is false for NaN but
``not x > tol`` is true, and ``max(1e-15, nan)`` is ``1e-15``. :func:`max_abs_diff` is the
NaN-propagating replacement for ``max(... for ...)`` over differences of tensors.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Iterable

import numpy as np
import torch

from companion._validate import check_type

__all__ = ["ClaimError", "claim", "max_abs_diff"]

_OPS = {"lt": ("<", operator.lt), "le": ("<=", operator.le),
        "gt": (">", operator.gt), "ge": (">=", operator.ge)}


class ClaimError(AssertionError):
    """A claim that the measurement does not support (or a non-finite measurement)."""


def _as_float(name: str, value) -> float:
    if isinstance(value, torch.Tensor | np.ndarray):
        count = value.numel() if isinstance(value, torch.Tensor) else value.size
        if count != 1:
            raise TypeError(f"{name} must be a number or a one-element tensor, "
                            f"got a tensor of shape {tuple(value.shape)}")
        return float(value.item())
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number (int, float or a NumPy scalar), "
                        f"got {type(value).__name__}")
    return float(value)


def max_abs_diff(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """``max |a - b|`` over all entries of all pairs; NaN if any entry is NaN.

    Unlike ``max(... for ...)``, a NaN anywhere gives NaN (and so fails any claim), and
    shapes must agree exactly (no broadcasting hides a missing dimension).
    """
    worst = -math.inf
    count = 0
    for a, b in pairs:
        if a.shape != b.shape:
            raise ValueError(f"pair {count}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
        count += 1
        if a.numel() == 0:
            continue
        diff = (a.detach() - b.detach()).abs()  # in the inputs' (promoted) dtype
        if torch.isnan(diff).any():
            return math.nan
        worst = max(worst, diff.max().item())
    if count == 0:
        raise ValueError("pairs is empty: there is nothing to compare")
    return 0.0 if worst == -math.inf else worst


def claim(key: str, value, *, lt=None, le=None, gt=None, ge=None, fmt: str = ".3g",
          glue: bool = True) -> float:
    """Check ``value`` against the given bounds, print it with its margin, glue it.

    ``lt``/``le``/``gt``/``ge`` are the bounds (at least one). The claim fails, raising
    :class:`ClaimError`, when ``value`` is not finite or violates a bound. The printed
    line is ``key = value  (claim: < bound, margin m)`` where the margin is the distance
    to the nearest bound (positive when the claim holds); numbers use ``fmt``. With
    ``glue`` the value, as printed, is glued under ``key`` for ``{glue:text}`` in the
    prose (only inside an IPython kernel). Returns the value as a float.
    """
    check_type("key", key, str)
    if not key or any(c.isspace() for c in key):
        raise ValueError(f"key must be a non-empty word without spaces, got {key!r}")
    bounds = {name: _as_float(name, b) for name, b in
              (("gt", gt), ("ge", ge), ("lt", lt), ("le", le)) if b is not None}
    if not bounds:
        raise ValueError("give at least one bound: lt, le, gt or ge")
    for name, bound in bounds.items():
        if not math.isfinite(bound):
            raise ValueError(f"{name} must be finite, got {bound}")
    x = _as_float("value", value)
    parts, margin = [], math.inf
    for name, bound in bounds.items():
        symbol, _ = _OPS[name]
        parts.append(f"{symbol} {bound:{fmt}}")
        margin = min(margin, bound - x if name in ("lt", "le") else x - bound)
    line = f"{key} = {x:{fmt}}  (claim: {' and '.join(parts)}, margin {margin:{fmt}})"
    print(line)
    if not math.isfinite(x):
        raise ClaimError(f"{key}: the measurement is {x}, not a finite number")
    failed = [f"{_OPS[n][0]} {b:{fmt}}" for n, b in bounds.items() if not _OPS[n][1](x, b)]
    if failed:
        raise ClaimError(f"{key} = {x:{fmt}} does not satisfy {' and '.join(failed)}")
    if glue:
        try:
            shown = float(f"{x:{fmt}}")  # the prose pastes the number as printed
        except ValueError:  # a format such as ".1%" that float() cannot read back
            shown = x
        _glue(key, shown)
    return x


def _glue(key: str, value: float) -> None:
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython ships with the book's environment
        return
    if get_ipython() is None:
        return
    from companion.notebook import glue
    glue(key, value, display=False)
