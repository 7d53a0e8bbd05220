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
  A tolerance covers the number that needs it, not the whole cell: ``on=NAME`` scopes a
  marker to the glued values and the output lines whose key or text contains ``NAME``
  (:func:`companion.claims.claim` prints its key on its line); every other number in the
  cell keeps the cell's unscoped tolerance (default: exact digits). A cell may have one
  unscoped marker and one marker per name. An unscoped ``rtol`` above
  :data:`MAX_UNSCOPED_RTOL` and any ``image`` above :data:`MAX_IMAGE_RMS` are refused.
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
#: Largest declared image tolerance: the same figure with one curve halved differs by
#: more than 10, so a larger tolerance would let such a mistake through.
MAX_IMAGE_RMS = 10.0
#: Largest relative tolerance a marker may declare for every number of a cell; a wider
#: one must name the number it covers (``on=``).
MAX_UNSCOPED_RTOL = 0.05

MARKER = "NBVAL_TOLERANCE"
_MARKER_LINE = re.compile(rf"^\s*#\s*{MARKER}\b(?P<body>.*)$", re.MULTILINE)
_KEYS = ("rtol", "atol", "image", "on")
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
    on: str = ""  # the glue key or line label the tolerance is scoped to ("" = the cell)

    @property
    def exact_digits(self) -> bool:
        return self.rtol == 0.0 and self.atol == 0.0


@dataclass(frozen=True)
class CellTolerances:
    """A cell's unscoped tolerance and its tolerances scoped by name (``on=``)."""

    default: Tolerance = Tolerance()
    scoped: tuple[Tolerance, ...] = ()

    def for_line(self, line: str) -> Tolerance:
        """The tolerance of the numbers on one output line: the first scoped name it contains."""
        return next((t for t in self.scoped if t.on in line), self.default)

    def for_glue(self, name: str) -> Tolerance:
        """The tolerance of a glued value: the first scoped name its key contains."""
        return next((t for t in self.scoped if t.on in name), self.default)


def _parse_marker(body: str) -> Tolerance:
    spec, colon, reason = body.partition(":")
    reason = reason.strip()
    if not colon or not reason:
        raise ValueError(f"{MARKER} needs a reason after a colon, e.g. "
                         f"'# {MARKER} rtol=1e-2: loss after training; CPU kernels differ'")
    values: dict[str, float | str] = {}
    for item in spec.split():
        key, eq, value = item.partition("=")
        if key not in _KEYS or not eq or not value:
            raise ValueError(f"{MARKER}: expected key=value with key in {_KEYS}, got {item!r}")
        if key in values:
            raise ValueError(f"{MARKER}: {key} given twice")
        if key == "on":
            values[key] = value
            continue
        number = float(value)
        if not math.isfinite(number) or number < 0:
            raise ValueError(f"{MARKER}: {key} must be a finite number >= 0, got {value!r}")
        values[key] = number
    if not set(values) - {"on"}:
        raise ValueError(f"{MARKER}: give at least one of {_KEYS[:3]}")
    tol = Tolerance(reason=reason, **values)
    if tol.image > MAX_IMAGE_RMS:
        raise ValueError(f"{MARKER}: image={tol.image:g} is above {MAX_IMAGE_RMS:g}, the RMS "
                         "of a figure with one curve halved; compare the plotted data or "
                         "plot a stable seed band instead")
    if not tol.on and tol.rtol > MAX_UNSCOPED_RTOL:
        raise ValueError(f"{MARKER}: rtol={tol.rtol:g} above {MAX_UNSCOPED_RTOL:g} must name "
                         "the number it covers (on=GLUE_KEY or a label on its output line)")
    if tol.on and tol.image != DEFAULT_IMAGE_RMS:
        raise ValueError(f"{MARKER}: image= applies to the cell's figures, not to on={tol.on}")
    return tol


def parse_tolerances(source: str) -> CellTolerances:
    """The tolerances a cell's source declares (default: exact digits everywhere).

    Raises ``ValueError`` for a malformed marker: two unscoped markers or two for one
    name, an unknown key, a negative or non-finite value, a missing reason, an image
    tolerance above :data:`MAX_IMAGE_RMS`, an unscoped rtol above
    :data:`MAX_UNSCOPED_RTOL`.
    """
    default, scoped = None, []
    for body in _MARKER_LINE.findall(source):
        tol = _parse_marker(body)
        if tol.on:
            if any(t.on == tol.on for t in scoped):
                raise ValueError(f"{MARKER}: two markers for on={tol.on}")
            scoped.append(tol)
        elif default is not None:
            raise ValueError(f"one unscoped {MARKER} line per cell; scope the others with on=")
        else:
            default = tol
    return CellTolerances(default or Tolerance(), tuple(scoped))


def parse_tolerance(source: str) -> Tolerance:
    """The cell's unscoped tolerance (see :func:`parse_tolerances`)."""
    return parse_tolerances(source).default


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


def _number_tolerances(text: str, tol: Tolerance | CellTolerances) -> list[Tolerance]:
    """The tolerance of each number in ``text``, by the output line it stands on."""
    if isinstance(tol, Tolerance):
        return [tol] * len(NUMBER.findall(text))
    return [tol.for_line(line) for line in text.splitlines() for _ in NUMBER.findall(line)]


def compare_text(stored: str, fresh: str, tol: Tolerance | CellTolerances) -> Comparison:
    """Compare two text outputs: same text, integers equal, other numbers within ``tol``.

    With :class:`CellTolerances`, each number takes the tolerance of its output line.
    """
    result = Comparison()
    text_s, num_s = _split(stored)
    text_f, num_f = _split(fresh)
    if text_s != text_f or len(num_s) != len(num_f):
        return result.fail("the text differs (not only its numbers)")
    result.numbers = len(num_s)
    tolerances = _number_tolerances(stored, tol)
    for i, (a, b) in enumerate(zip(num_s, num_f)):
        tol = tolerances[i]
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


def compare_value(key: str, stored, fresh, tol: Tolerance | CellTolerances) -> Comparison:
    """Compare one output field: text tolerantly, figures by RMS, the rest exactly.

    A glued value's key is ``GLUE_KEY#name``; it takes the tolerance scoped to ``name``.
    """
    if isinstance(stored, list):
        stored = "".join(stored)
    if isinstance(fresh, list):
        fresh = "".join(fresh)
    cell_tol = tol if isinstance(tol, CellTolerances) else CellTolerances(tol)
    if key in IMAGE_KEYS:
        return compare_image(stored, fresh, cell_tol.default)
    glue_key, _, name = key.partition("#")
    if glue_key == GLUE_KEY and name:
        if isinstance(stored, str) and isinstance(fresh, str):
            return compare_text(stored, fresh, cell_tol.for_glue(name))
    elif key in TEXT_KEYS and isinstance(stored, str) and isinstance(fresh, str):
        return compare_text(stored, fresh, cell_tol)
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
                name = (output.get("metadata") or {}).get("scrapbook", {}).get("name", "")
                for mime, content in value.items():
                    if mime not in skip:
                        field = f"{mime}#{name}" if mime == GLUE_KEY and name else mime
                        flat[field].append(content if mime in IMAGE_KEYS
                                           else cell.sanitize(content))
            else:
                flat[key].append(cell.sanitize(value))
    return flat


def _report(cell, tols: CellTolerances, results: list[Comparison]) -> None:
    path = os.environ.get("NBVAL_TOLERANT_REPORT")
    if not path:
        return
    tol = tols.default
    record = {
        "cell": cell.nodeid,
        "rtol": max([tol.rtol] + [t.rtol for t in tols.scoped]),
        "atol": max([tol.atol] + [t.atol for t in tols.scoped]), "image": tol.image,
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
        tol = parse_tolerances(self.cell.source)
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
