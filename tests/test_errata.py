"""The errata appendix quotes the source articles exactly.

Each row of ``book/appendix/errata.md`` starts with what the article says: Chinese text
in 「」, or the article's code in backticks, or its formula in ``$...$``. Every such quote
must be a verbatim span of the articles, so that a correction never answers a paraphrase.
The articles are not part of the book's repository: they lie in ``../shared/seeds/``
beside a development checkout (or where ``COMPANION_SEEDS`` points), and the test is
skipped where they are absent, as in a reader's clone.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SEEDS = Path(os.environ.get("COMPANION_SEEDS", ROOT.parent / "shared" / "seeds"))
ERRATA = ROOT / "book" / "appendix" / "errata.md"


def _rows() -> list[str]:
    """The first cell of every table row (header and rule lines excluded)."""
    rows = []
    for line in ERRATA.read_text(encoding="utf-8").splitlines():
        if not line.startswith("| ") or line.startswith(("| The article says", "| ---")):
            continue
        rows.append(line[2:].split(" | ")[0])
    return rows


def quotes(cell: str) -> list[str]:
    """Quoted spans of an errata cell: 「Chinese」, `code`, and $formulas$ with a TeX command."""
    found = re.findall(r"「(.+?)」", cell) + re.findall(r"`([^`]+)`", cell)
    without_chinese = re.sub(r"「.+?」", "", cell)
    found += [m for m in re.findall(r"\$(.+?)\$", without_chinese) if "\\" in m and "=" in m]
    return found


def test_quote_extraction():
    cell = "「计算输出层梯度」 (the gradient): $\\frac{a}{b} = c$ and `x = f(y)`, $n$"
    assert quotes(cell) == ["计算输出层梯度", "x = f(y)", "\\frac{a}{b} = c"]


def test_every_row_quotes_the_article():
    rows = _rows()
    assert len(rows) >= 10
    unquoted = [row[:60] for row in rows if not quotes(row)]
    assert not unquoted, f"rows without a quote of the article: {unquoted}"


@pytest.mark.skipif(not SEEDS.is_dir(), reason=f"the source articles are not here ({SEEDS})")
def test_every_quote_is_verbatim():
    articles = "".join(p.read_text(encoding="utf-8") for p in sorted(SEEDS.glob("*.txt")))
    assert articles
    missing = [q for row in _rows() for q in quotes(row) if q not in articles]
    assert not missing, f"quotes that are not verbatim spans of the articles: {missing}"
