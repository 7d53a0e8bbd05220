"""nbval's output comparison, tolerant of arithmetic and of nothing else (a pytest plugin).

nbval re-runs every notebook and compares each cell's fresh outputs with the stored ones.
Out of the box it compares text character by character and skips figures. This plugin
replaces that comparison (``IPyNbCell.compare_outputs``) with one that holds on every
reader's machine -- CPU kernels with or without AVX-512, Apple Silicon, another BLAS --
without letting a mistake through:

* **Text** (``text/plain``, ``text/html``, ``text/markdown``, ``text/latex``, stdout) is
  split into numbers and the text between them. The text must be identical, except that
  horizontal spacing next to a number is ignored (tables align on the numbers' widths).
* **Integers** (no decimal point, no exponent) are always compared exactly: they are
  counts, sizes, steps, indices -- exact arithmetic.
* **Other numbers** reproduce their printed digits exactly by default. A cell that needs
  more declares it in its source, on one comment line with a reason::

      # NBVAL_TOLERANCE rtol=2e-2 atol=1e-3 image=3: training loss; CPU kernels differ

  and a number then passes when ``|fresh - stored| <= atol + rtol * |stored|``. The
  tolerance is a measured spread (``make test-portable`` and a few seeds), not a guess.
* **Figures** (``image/png``) are decoded and compared by their RMS pixel difference on
  the 0-255 scale, as ``matplotlib.testing.compare`` does; they must have the same size.
  The default, :data:`DEFAULT_IMAGE_RMS`, absorbs anti-aliasing of lines that moved by
  rounding error; ``image=`` raises it for a cell whose figure shows trained results.
* Everything else (``application/json``, widget state, ...) is compared exactly, and so
  are the number and kinds of outputs.

Set ``NBVAL_TOLERANT_REPORT=path.jsonl`` to append, for every compared cell, the largest
deviation seen (relative and absolute for non-integers, RMS for figures): how the
spreads behind the declared tolerances are measured.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

#: Largest RMS pixel difference (0-255) of a figure without a declared ``image=``
#: tolerance. Measured under the CPU variants of ``make test-portable``: figures whose
#: data moved only by rounding error differ by at most 0.41 (most by under 0.1), while
#: the same figure with one curve halved differs by more than 10 (the unit tests).
DEFAULT_IMAGE_RMS = 1.0

MARKER = "NBVAL_TOLERANCE"
_MARKER_LINE = re.compile(rf"^\s*#\s*{MARKER}\b(?P<body>.*)$", re.MULTILINE)
_KEYS = ("rtol", "atol", "image")
# Values glued with myst_nb.glue(..., display=False) are stored under this MIME type: the
# numbers that the prose pastes, compared like the printed ones.
GLUE_KEY = "application/papermill.record/text/plain"
TEXT_KEYS = ("text/plain", "text/html", "text/markdown", "text/latex", "stdout", "stderr",
             GLUE_KEY)
IMAGE_KEYS = ("image/png",)
# A number not glued to a word: "0.25", "-3", "1e-13", ".5"; a full stop after it is text.
# "float16", "e4m3", "x1" and "3x" stay text (and are compared exactly).
NUMBER = re.compile(r"(?<![\w.])(?>[-+]?(?:\d+(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?)(?!\w)")


@dataclass(frozen=True)
class Tolerance:
    """What a cell allows: ``rtol``/``atol`` for non-integer numbers, ``image`` RMS."""

    rtol: float = 0.0
    atol: float = 0.0
    image: float = DEFAULT_IMAGE_RMS
    reason: str = ""

    @property
    def exact_digits(self) -> bool:
        return self.rtol == 0.0 and self.atol == 0.0


def parse_tolerance(source: str) -> Tolerance:
    """The tolerance a cell's source declares (default: exact digits).

    Raises ``ValueError`` for a malformed marker: more than one, an unknown key, a
    negative or non-finite value, or a missing reason.
    """
    markers = _MARKER_LINE.findall(source)
    if not markers:
        return Tolerance()
    if len(markers) > 1:
        raise ValueError(f"one {MARKER} line per cell, found {len(markers)}")
    body = markers[0]
    spec, colon, reason = body.partition(":")
    reason = reason.strip()
    if not colon or not reason:
        raise ValueError(f"{MARKER} needs a reason after a colon, e.g. "
                         f"'# {MARKER} rtol=1e-2: loss after training; CPU kernels differ'")
    values: dict[str, float] = {}
    for item in spec.split():
        key, eq, value = item.partition("=")
        if key not in _KEYS or not eq:
            raise ValueError(f"{MARKER}: expected key=value with key in {_KEYS}, got {item!r}")
        if key in values:
            raise ValueError(f"{MARKER}: {key} given twice")
        number = float(value)
        if not math.isfinite(number) or number < 0:
            raise ValueError(f"{MARKER}: {key} must be a finite number >= 0, got {value!r}")
        values[key] = number
    if not values:
        raise ValueError(f"{MARKER}: give at least one of {_KEYS}")
    return Tolerance(reason=reason, **values)


@dataclass
class Comparison:
    """The verdict on one pair of outputs, with the largest deviations seen."""

    ok: bool = True
    why: str = ""
    max_rel: float = 0.0
    max_abs: float = 0.0
    image_rms: float = 0.0
    numbers: int = field(default=0)

    def fail(self, why: str) -> Comparison:
        if self.ok:
            self.ok, self.why = False, why
        return self


def _is_integer(token: str) -> bool:
    return not any(c in token for c in ".eE")


def _split(text: str) -> tuple[list[str], list[str]]:
    """Text between numbers (horizontal spacing at the edges dropped) and the numbers."""
    pieces = NUMBER.split(text)
    numbers = NUMBER.findall(text)
    return [re.sub(r"[ \t]+", " ", p).strip(" \t") for p in pieces], numbers


def compare_text(stored: str, fresh: str, tol: Tolerance) -> Comparison:
    """Compare two text outputs: same text, integers equal, other numbers within ``tol``."""
    result = Comparison()
    text_s, num_s = _split(stored)
    text_f, num_f = _split(fresh)
    if text_s != text_f or len(num_s) != len(num_f):
        return result.fail("the text differs (not only its numbers)")
    result.numbers = len(num_s)
    for i, (a, b) in enumerate(zip(num_s, num_f)):
        if a == b:
            continue
        if _is_integer(a) or _is_integer(b):
            return result.fail(f"number {i + 1}: integer {a} became {b} "
                               "(integers are compared exactly)")
        x, y = float(a), float(b)
        diff = abs(x - y)
        result.max_abs = max(result.max_abs, diff)
        result.max_rel = max(result.max_rel, diff / abs(x) if x else math.inf)
        if tol.exact_digits:
            result.fail(f"number {i + 1}: stored {a}, fresh {b} (compared to the printed "
                        f"digits; a cell that needs a tolerance declares '# {MARKER} ...')")
        elif not diff <= tol.atol + tol.rtol * abs(x):
            result.fail(f"number {i + 1}: stored {a}, fresh {b}: |diff| = {diff:.3g} > "
                        f"atol + rtol*|stored| = {tol.atol + tol.rtol * abs(x):.3g} "
                        f"(rtol={tol.rtol:g}, atol={tol.atol:g})")
    return result


def _decode_png(data: str) -> np.ndarray:
    from matplotlib import image

    pixels = image.imread(io.BytesIO(base64.b64decode(data)), format="png")
    if pixels.dtype != np.uint8:  # matplotlib returns floats in [0, 1] for PNG
        pixels = np.round(pixels * 255.0)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return pixels[:, :, :3].astype(np.float64)


def image_rms(stored: str, fresh: str) -> float:
    """RMS difference of two base64 PNGs on the 0-255 scale (``inf`` if sizes differ)."""
    a, b = _decode_png(stored), _decode_png(fresh)
    if a.shape != b.shape:
        return math.inf
    return float(np.sqrt(np.mean((a - b) ** 2)))


def compare_image(stored: str, fresh: str, tol: Tolerance) -> Comparison:
    result = Comparison()
    if stored == fresh:
        return result
    rms = image_rms(stored, fresh)
    result.image_rms = rms
    if not rms <= tol.image:
        size = "a different size" if math.isinf(rms) else f"RMS difference {rms:.2f}"
        result.fail(f"the figure changed: {size} > {tol.image:g} (0-255 scale)")
    return result


def compare_value(key: str, stored, fresh, tol: Tolerance) -> Comparison:
    """Compare one output field: text tolerantly, figures by RMS, the rest exactly."""
    if isinstance(stored, list):
        stored = "".join(stored)
    if isinstance(fresh, list):
        fresh = "".join(fresh)
    if key in IMAGE_KEYS:
        return compare_image(stored, fresh, tol)
    if key in TEXT_KEYS and isinstance(stored, str) and isinstance(fresh, str):
        return compare_text(stored, fresh, tol)
    return Comparison() if stored == fresh else Comparison().fail("the output differs")


# ----------------------------------------------------------------------- nbval hook


def _flatten(cell, outputs, skip) -> dict[str, list]:
    """nbval's flattening: every kept key (MIME types of ``data`` lifted) -> its values."""
    from nbval.plugin import transform_streams_for_comparison

    flat: dict[str, list] = defaultdict(list)
    for output in transform_streams_for_comparison(outputs):
        for key, value in output.items():
            if key in skip:
                continue
            if key == "data":
                for mime, content in value.items():
                    if mime not in skip:
                        flat[mime].append(content if mime in IMAGE_KEYS
                                          else cell.sanitize(content))
            else:
                flat[key].append(cell.sanitize(value))
    return flat


def _report(cell, tol: Tolerance, results: list[Comparison]) -> None:
    path = os.environ.get("NBVAL_TOLERANT_REPORT")
    if not path:
        return
    record = {
        "cell": cell.nodeid,
        "rtol": tol.rtol, "atol": tol.atol, "image": tol.image,
        "ok": all(r.ok for r in results),
        "max_rel": max((r.max_rel for r in results), default=0.0),
        "max_abs": max((r.max_abs for r in results), default=0.0),
        "image_rms": max((r.image_rms for r in results), default=0.0),
        "why": next((r.why for r in results if not r.ok), ""),
    }
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def compare_outputs(self, test, ref, skip_compare=None):
    """Replacement for ``nbval.plugin.IPyNbCell.compare_outputs`` (same contract)."""
    skip = tuple(k for k in (skip_compare or self.parent.skip_compare) if k not in IMAGE_KEYS)
    self.comparison_traceback = []
    try:
        tol = parse_tolerance(self.cell.source)
    except ValueError as err:
        self.comparison_traceback.append(f"bad tolerance marker: {err}")
        return False
    stored, fresh = _flatten(self, ref, skip), _flatten(self, test, skip)
    if set(stored) != set(fresh):
        self.comparison_traceback.append(
            f"output fields differ: stored {sorted(stored)}, fresh {sorted(fresh)}")
        return False
    results = []
    for key in stored:
        if len(stored[key]) != len(fresh[key]):
            self.comparison_traceback.append(
                f"{len(stored[key])} stored and {len(fresh[key])} fresh outputs of {key!r}")
            return False
        for a, b in zip(stored[key], fresh[key]):
            result = compare_value(key, a, b, tol)
            results.append(result)
            if not result.ok:
                _report(self, tol, results)
                self.comparison_traceback.append(f"{key}: {result.why}")
                if key not in IMAGE_KEYS:
                    self.format_output_compare(key, a, b)
                return False
    _report(self, tol, results)
    return True


def pytest_configure(config):
    from nbval.plugin import IPyNbCell

    IPyNbCell.compare_outputs = compare_outputs
