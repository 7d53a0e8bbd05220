"""Measured numbers in the book's prose come from outputs (MyST-NB glue), not from typing.

What counts as a *measured number* in a chapter's markdown cells or an appendix page:
a number with a decimal point (``0.967``), a percentage (``95 %``), an exponent
(``1e-8``, ``3 × 10^4`` outside math), a ratio (``3×``, ``2.5x``), or thousands
separators (``1,797``). Small integers ("3 layers", "rank 8", "chapter 4", years) do not
count: they are settings and names, and exact.

It is allowed when it is

* pasted from an output: ``{glue:text}`key:.3f``` (any ``{glue...}`` role), or
* a constant from a paper: the same sentence cites it (``{cite}`key```), or
* not prose: inside inline code, a code block, or mathematics (``$...$``, ``$$...$$``,
  ``{math}``), a link target, a version or section number (``Python 3.11``,
  ``section 4.2``), or one of the few literal phrases in :data:`ALLOWED`.

A chapter that states a measured number any other way fails here: the number would
drift from the output that computes it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(p for p in (ROOT / "book").glob("*.ipynb"))
PAGES = [ROOT / "book" / "intro.md",
         *sorted(p for p in (ROOT / "book" / "appendix").glob("*.md")
                 if not p.name.startswith("benchmarks_"))]  # generated tables are outputs

#: Phrases that look like measurements but are names or definitions (keep this short).
ALLOWED: tuple[str, ...] = (
    "float8_e4m3fn", "float8_e5m2",
)

_CODE_FENCE = re.compile(r"^(`{3,}|~{3,})(.*?)$.*?^\1\s*$", re.MULTILINE | re.DOTALL)
_KEEP_FENCES = ("{admonition}", "{note}", "{warning}", "{tip}", "{important}", "{caution}",
                "{hint}", "{seealso}", "{attention}", "{danger}", "{error}", "{exercise}",
                "{solution}", "{dropdown}", "{margin}", "{sidebar}", "{epigraph}", "{topic}")
_STRIP = [
    re.compile(r"\$\$.*?\$\$", re.DOTALL),                 # display math
    re.compile(r"(?<!\\)\$[^$\n]+?(?<!\\)\$"),             # inline math
    re.compile(r"\\\(.*?\\\)|\\\[.*?\\\]", re.DOTALL),     # \( \) and \[ \]
    re.compile(r"\{glue[^}]*\}`[^`]*`"),                   # glued outputs
    re.compile(r"\{[a-z:-]+\}`[^`]*`"),                    # other roles: cite, ref, doc, eq
    re.compile(r"``.+?``|`[^`\n]+`"),                      # inline code
    re.compile(r"\]\([^)]*\)"),                            # link targets
    re.compile(r"<[^>\n]+>"),                              # HTML tags and autolinks
    re.compile(r"^\s*:[a-z-]+:.*$", re.MULTILINE),         # directive options (:label: ...)
    re.compile(r"\b(?:Python|CPython|PyTorch|torch|NumPy|Captum|scikit-learn|MyST-NB|Sphinx|"
               r"jupyter-book|Jupyter Book|MathJax|Mermaid|Opacus|PEFT|ONNX|opset|CUDA|"
               r"version|v)\s?\d+(?:\.\d+)+(?:\.x)?", re.IGNORECASE),
    re.compile(r"\b(?:section|chapter|chapters|figure|table|equation|eq\.|§|step|steps)"
               r"\s+\d+(?:\.\d+)+", re.IGNORECASE),
]
MEASURED = re.compile(
    r"(?<![\w.])(?:\d+(?:\.\d+)?\s?(?:%|×|x\b)"           # 95 %, 3×, 2.5x
    r"|\d+(?:\.\d+)?[eE][-+]?\d+"                          # 1e-8
    r"|\d+\s?×\s?10"                                       # 3 × 10^4
    r"|\d{1,3}(?:,\d{3})+(?!\d)"                           # 1,797
    r"|\d+\.\d+)")                                         # 0.967
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z(*_\[])|\n\s*\n|\n\s*[-*|>]\s")


def prose(markdown: str) -> str:
    """The markdown with code, mathematics, roles and link targets removed."""
    def fence(match: re.Match) -> str:
        info = match.group(2).strip()
        if any(info.startswith(k) for k in _KEEP_FENCES):
            return match.group(0)[len(match.group(1)) + len(match.group(2)):]
        return ""

    text = _CODE_FENCE.sub(fence, markdown)
    for pattern in _STRIP:
        text = pattern.sub(" ", text)
    for phrase in ALLOWED:
        text = text.replace(phrase, " ")
    return text


def unglued_numbers(markdown: str) -> list[str]:
    """The measured numbers of ``markdown`` that are neither glued nor cited."""
    found = []
    for sentence in _SENTENCE.split(markdown):
        if "{cite" in sentence:
            continue
        found += [m.group(0) for m in MEASURED.finditer(prose(sentence))]
    return found


def _markdown_of(path: Path) -> str:
    if path.suffix == ".md":
        return path.read_text(encoding="utf-8")
    nb = json.loads(path.read_text(encoding="utf-8"))
    return "\n\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")


@pytest.mark.parametrize("path", NOTEBOOKS + PAGES, ids=lambda p: p.name)
def test_measured_numbers_in_prose_are_glued(path):
    numbers = unglued_numbers(_markdown_of(path))
    assert not numbers, (f"{path.name}: measured numbers typed into the prose: {numbers}; "
                         "glue them from the output that computes them (myst_nb.glue and "
                         "{glue:text}), or cite the paper they come from in the same sentence")


@pytest.mark.parametrize("text, flagged", [
    ("The run reaches 0.967 accuracy.", ["0.967"]),
    ("It reaches about 95 % of the test set.", ["95 %"]),
    ("The error is 1e-8 and it is 3× faster; 1,797 images.", ["1e-8", "3×", "1,797"]),
    ("The run reaches {glue:text}`ch2_acc:.3f` accuracy.", []),
    ("GPT-3 has 175.0 billion parameters {cite}`brown2020`. We use 0.5 here.", ["0.5"]),
    ("Use `lr=0.1` and $\\eta = 0.1$ with 3 layers in chapter 4 on Python 3.11.", []),
    ("```python\nx = 0.25\n```\nSee [the paper](https://arxiv.org/abs/1412.6980).", []),
    ("```{note}\nIt is 0.25 here.\n```", ["0.25"]),
    ("The float8_e4m3fn format.", []),
])
def test_what_counts_as_a_measured_number(text, flagged):
    assert unglued_numbers(text) == flagged
