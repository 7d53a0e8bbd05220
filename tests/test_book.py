"""The book's own rules (README, "Conventions for contributors"), checked on every notebook
and the table of contents.

These are structural checks; nbval (run in the same pytest session) checks that each
notebook's stored outputs are what its code produces.
"""

from __future__ import annotations

import ast
import importlib
import json
import pkgutil
import re
from pathlib import Path

import pytest
import yaml

import companion

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(p for p in (ROOT / "book").rglob("*.ipynb")
                   if ".ipynb_checkpoints" not in p.parts)


def _toc_files() -> set[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = {toc["root"]}
    for part in toc.get("parts", []):
        for chapter in part["chapters"]:
            files.add(chapter["file"])
            files.update(section["file"] for section in chapter.get("sections", []))
    return files


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _code_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def _source(cell: dict) -> str:
    return "".join(cell["source"])


def _package_names() -> set[str]:
    names = set()
    for info in pkgutil.iter_modules(companion.__path__):
        module = importlib.import_module(f"companion.{info.name}")
        names.update(n for n, v in vars(module).items()
                     if not n.startswith("_") and getattr(v, "__module__", None) == module.__name__)
    return names


def test_there_are_notebooks():
    assert NOTEBOOKS


def test_toc_and_files_agree():
    toc = _toc_files()
    for entry in toc:
        assert any((ROOT / f"{entry}{ext}").exists() for ext in (".md", ".ipynb")), entry
    for nb in NOTEBOOKS:
        assert str(nb.relative_to(ROOT).with_suffix("")) in toc, f"{nb.name} is not in _toc.yml"


@pytest.fixture(params=NOTEBOOKS, ids=lambda p: p.name)
def notebook(request):
    return request.param, _load(request.param)


def test_every_code_cell_ran_in_order(notebook):
    path, nb = notebook
    counts = [c["execution_count"] for c in _code_cells(nb) if _source(c).strip()]
    assert counts == list(range(1, len(counts) + 1)), (
        f"{path.name}: execution counts {counts[:8]}...; run `make notebooks`")


def test_starts_by_seeding_and_imports_the_package(notebook):
    path, nb = notebook
    first = _source(_code_cells(nb)[0])
    assert "setup(" in first or "seed_everything(" in first, \
        f"{path.name}: the first code cell must seed everything (companion.notebook.setup)"
    assert "companion" in first, f"{path.name}: the first code cell must import companion"


def test_outputs_are_clean(notebook):
    path, nb = notebook
    for i, cell in enumerate(_code_cells(nb)):
        tags = cell.get("metadata", {}).get("tags", [])
        for out in cell["outputs"]:
            assert out.get("name") != "stderr", f"{path.name} code cell {i}: stderr output"
            if out["output_type"] == "error":
                assert "raises-exception" in tags, f"{path.name} code cell {i}: unexpected error"
            text = json.dumps(out.get("text", "")) + json.dumps(
                {k: v for k, v in out.get("data", {}).items() if not k.startswith("image/")})
            assert not re.search(r"/(root|home|tmp|work|Users)/", text), (
                f"{path.name} code cell {i}: absolute path in output")
            assert not re.search(r"0x[0-9a-f]{8,}", text), f"{path.name} cell {i}: memory address"
        kinds = [(o["output_type"], o.get("name")) for o in cell["outputs"]]
        assert all(a != b or a[0] != "stream" for a, b in zip(kinds, kinds[1:])), (
            f"{path.name} code cell {i}: consecutive stream outputs; run `make notebooks`")


def test_claims_are_asserted_and_exercises_have_checked_solutions(notebook):
    path, nb = notebook
    code = "\n".join(_source(c) for c in _code_cells(nb))
    markdown = "\n".join(_source(c) for c in nb["cells"] if c["cell_type"] == "markdown")
    checks = code.count("assert ") + code.count("claim(")
    assert checks >= 5, f"{path.name}: too few claim cells"
    assert "## Objectives" in markdown or ":class: tip" in markdown, f"{path.name}: objectives"
    assert "## Summary" in markdown, f"{path.name}: summary"
    assert "## Exercises" in markdown, f"{path.name}: exercises"
    solutions = re.findall(r"```\{solution-start\}\s+(\S+)", markdown)
    exercises = re.findall(r":label: (\S+)", markdown)
    assert solutions, f"{path.name}: no hidden solutions"
    assert set(solutions) <= set(exercises), f"{path.name}: solution without exercise"
    # each gated solution contains at least one code cell with an assert
    cells = nb["cells"]
    for i, cell in enumerate(cells):
        if cell["cell_type"] == "markdown" and "{solution-start}" in _source(cell):
            j = i + 1
            body = []
            while "{solution-end}" not in _source(cells[j]):
                body.append(cells[j])
                j += 1
            checked = [c for c in body if c["cell_type"] == "code"
                       and ("assert" in _source(c) or "claim(" in _source(c))]
            assert checked, (
                f"{path.name}: a solution without a checked code cell")


def test_notebooks_do_not_redefine_the_package(notebook):
    path, nb = notebook
    package = _package_names()
    for cell in _code_cells(nb):
        source = "\n".join(line for line in _source(cell).splitlines()
                           if not line.lstrip().startswith(("%", "!")))
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                assert node.name not in package, (
                    f"{path.name} defines {node.name}, which companion already has")


def test_make_notebooks_merges_consecutive_streams():
    import nbformat
    from execute_notebooks import merge_streams

    out = nbformat.v4.new_output
    outputs = [out("stream", name="stdout", text="a\n"), out("stream", name="stdout", text="b\n"),
               out("stream", name="stderr", text="w\n"), out("stream", name="stdout", text="c\n"),
               out("execute_result", data={"text/plain": "1"}),
               out("stream", name="stdout", text="d\n")]
    merged = merge_streams(outputs)
    assert [(o.output_type, o.get("name"), o.get("text")) for o in merged] == [
        ("stream", "stdout", "a\nb\n"), ("stream", "stderr", "w\n"), ("stream", "stdout", "c\n"),
        ("execute_result", None, None), ("stream", "stdout", "d\n")]


#: The rendered book shows 88 columns of code without scrolling (book/_static/custom.css).
CODE_COLUMNS = 88


def test_code_fits_the_page(notebook):
    path, nb = notebook
    long = [f"code cell {i}: {line[:60]}... ({len(line)} characters)"
            for i, cell in enumerate(_code_cells(nb))
            for line in _source(cell).split("\n") if len(line) > CODE_COLUMNS]
    assert not long, (f"{path.name}: lines over {CODE_COLUMNS} characters scroll sideways in "
                      f"the book (ruff format --line-length {CODE_COLUMNS}):\n" + "\n".join(long))


def test_few_cells_escape_the_comparison(notebook):
    """Cells left out of the output comparison are timings and the like: at most 5 % of a
    notebook's code cells (rounded up), so that portability is never bought by comparing
    less. Each such cell's claim is asserted in a compared cell."""
    import math

    path, nb = notebook
    cells = _code_cells(nb)
    tags = {"nbval-ignore-output", "nbval-skip"}
    escaped = [i for i, c in enumerate(cells)
               if re.search(r"^\s*#\s*NBVAL_(IGNORE_OUTPUT|SKIP)\b", _source(c), re.MULTILINE)
               or tags & set(c.get("metadata", {}).get("tags", []))]
    assert len(escaped) <= math.ceil(0.05 * len(cells)), (
        f"{path.name}: code cells {escaped} are not compared ({len(escaped)} of {len(cells)})")


def test_tolerance_markers_are_well_formed(notebook):
    """Every NBVAL_TOLERANCE marker parses and gives its reason (tools/nbval_tolerant.py)."""
    from nbval_tolerant import parse_tolerance

    path, nb = notebook
    for i, cell in enumerate(_code_cells(nb)):
        try:
            parse_tolerance(_source(cell))
        except ValueError as err:
            raise AssertionError(f"{path.name} code cell {i}: {err}") from None


def _nan_blind_reductions(source: str) -> list[str]:
    """Calls of builtin max/min over a comprehension of differences: NaN-blind.

    ``max(1e-15, nan)`` is ``1e-15``: a NaN that is not first vanishes, and a check on the
    result passes. Differences (``a - b``, ``t.abs()``) are what such checks reduce;
    :func:`companion.claims.max_abs_diff` is the NaN-propagating replacement.
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:  # IPython magics
        return []
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in ("max", "min") and node.args):
            continue
        arg = node.args[0]
        if not isinstance(arg, ast.GeneratorExp | ast.ListComp | ast.SetComp):
            continue
        inner = list(ast.walk(arg.elt))
        differences = any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.Sub) for n in inner)
        tensor_abs = any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                         and n.func.attr in ("abs", "ptp") for n in inner)
        computed_abs = any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                           and n.func.id == "abs" and n.args
                           and isinstance(n.args[0], ast.Call | ast.BinOp) for n in inner)
        if differences or tensor_abs or computed_abs:
            found.append(ast.get_source_segment(source, node).splitlines()[0])
    return found


def test_nan_blind_pattern_is_detected():
    assert _nan_blind_reductions("gap = max((a - b).abs().max().item() for a, b in pairs)")
    assert _nan_blind_reductions("gap = max([abs(x - y) for x, y in zip(u, v)])")
    assert _nan_blind_reductions("gap = min(float(e.abs().max()) for e in errors)")
    assert not _nan_blind_reductions("top = max(abs(y) for y in heights)")
    assert _nan_blind_reductions("worst = max(abs(error(c)) for c in configs)")
    assert _nan_blind_reductions("spread = min(np.ptp(v[r]) for r in runs)")
    assert not _nan_blind_reductions("spread = np.amin([np.ptp(v[r]) for r in runs])")
    assert not _nan_blind_reductions("width = max(len(name) for name in names)")
    assert not _nan_blind_reductions("gap = max_abs_diff(zip(a, b))")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_nan_blind_reductions(path):
    """No notebook reduces differences with builtin max/min over a comprehension."""
    hits = [f"cell {i}: {hit}" for i, cell in enumerate(_load(path)["cells"])
            if cell["cell_type"] == "code" for hit in _nan_blind_reductions(_source(cell))]
    assert not hits, "NaN-blind: use companion.claims.max_abs_diff\n" + "\n".join(hits)


def test_no_nan_blind_reductions_in_the_package():
    hits = [f"{path.name}: {hit}" for path in sorted((ROOT / "companion").glob("*.py"))
            for hit in _nan_blind_reductions(path.read_text())]
    assert not hits, "NaN-blind: use companion.claims.max_abs_diff\n" + "\n".join(hits)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_glued_values_are_plain_numbers_or_text(path):
    """A glued NumPy scalar is stored as ``np.float64(0.03)``, which the prose cannot format."""
    bad = [out["metadata"]["scrapbook"]["name"]
           for cell in _code_cells(_load(path)) for out in cell.get("outputs", [])
           if "application/papermill.record/text/plain" in out.get("data", {})
           and "".join(out["data"]["application/papermill.record/text/plain"]).startswith("np.")]
    assert not bad, f"glue plain Python numbers (float(...), int(...)): {bad}"
