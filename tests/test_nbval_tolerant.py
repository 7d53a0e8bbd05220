"""The tolerant output comparison of tools/nbval_tolerant.py: what passes and what must fail."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import matplotlib
import nbformat
import numpy as np
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from nbval_tolerant import (  # noqa: E402
    DEFAULT_IMAGE_RMS,
    Tolerance,
    compare_image,
    compare_text,
    compare_value,
    image_rms,
    parse_tolerance,
    parse_tolerances,
)

ROOT = Path(__file__).resolve().parent.parent
EXACT = Tolerance()
LOOSE = Tolerance(rtol=1e-2, reason="test")


def test_issue_examples():
    assert compare_text("loss 0.1007\n", "loss 0.1009\n", LOOSE).ok
    assert not compare_text("accuracy 97.11 %", "accuracy 57.11 %", LOOSE).ok
    assert not compare_text("7 wrong", "6 wrong", LOOSE).ok
    assert not compare_text("7 wrong", "7 right", LOOSE).ok


def test_default_is_the_printed_digits():
    assert compare_text("loss 0.1007", "loss 0.1007", EXACT).ok
    result = compare_text("loss 0.1007", "loss 0.1009", EXACT)
    assert not result.ok and "0.1007" in result.why and "0.1009" in result.why
    assert math.isclose(result.max_abs, 2e-4, rel_tol=1e-9)


def test_integers_are_exact_even_with_a_tolerance():
    wide = Tolerance(rtol=0.5, atol=10.0, reason="test")
    assert not compare_text("step 750", "step 751", wide).ok
    assert not compare_text("1,797 images", "1,798 images", wide).ok
    assert not compare_text("0", "0.0", wide).ok           # an integer never becomes a float
    assert compare_text("ratio 2.0", "ratio 2.9", wide).ok  # floats use the tolerance


@pytest.mark.parametrize("stored, fresh", [
    ("halved 0.8", "halved 0.4"),
    ("sign -0.5", "sign 0.5"),
    ("1e-13", "1e-12"),
    ("nan", "0.5"),
    ("0.5", "nan"),
    ("inf", "1e308"),
])
def test_mistakes_fail_under_a_percent(stored, fresh):
    assert not compare_text(stored, fresh, LOOSE).ok


def test_text_and_structure_changes_fail():
    assert not compare_text("< 1e-13", "> 1e-13", LOOSE).ok
    assert not compare_text("a 1.0 b 2.0", "a 1.0 b", LOOSE).ok
    assert not compare_text("float16 0.5", "float32 0.5", LOOSE).ok
    assert not compare_text("diverged", "0.311", LOOSE).ok


def test_spacing_next_to_numbers_is_alignment():
    stored = "     lr   0.1   4.0\nb=8  0.120  1.364\n"
    fresh = "     lr   0.1   4.0\nb=8  0.120   1.37\n"
    assert compare_text(stored, fresh, LOOSE).ok
    assert not compare_text("a  b 1.0", "ab 1.0", LOOSE).ok  # spacing inside words is text


def test_html_tables_compare_their_numbers():
    stored = "<td>0.967</td><td>12</td>"
    assert compare_text(stored, "<td>0.970</td><td>12</td>", LOOSE).ok
    assert not compare_text(stored, "<td>0.967</td><td>13</td>", LOOSE).ok
    assert compare_value("text/html", stored, "<td>0.970</td><td>12</td>", LOOSE).ok
    assert not compare_value("application/json", {"a": 1}, {"a": 2}, LOOSE).ok


def test_glued_values_compare_their_numbers():
    glued = "application/papermill.record/text/plain"  # myst_nb.glue(..., display=False)
    assert compare_value(glued, "0.994", "0.997", Tolerance(rtol=5e-3, reason="test")).ok
    assert not compare_value(glued, "0.994", "0.997", EXACT).ok
    assert not compare_value(glued, "0.994", "0.497", LOOSE).ok


@pytest.mark.parametrize("source, expected", [
    ("x = 1", Tolerance()),
    ("# NBVAL_TOLERANCE rtol=2e-2: trained loss\nx = 1",
     Tolerance(rtol=0.02, reason="trained loss")),
    ("  #  NBVAL_TOLERANCE atol=1e-3 image=4: curves\n",
     Tolerance(atol=1e-3, image=4.0, reason="curves")),
])
def test_markers(source, expected):
    assert parse_tolerance(source) == expected


@pytest.mark.parametrize("source, match", [
    ("# NBVAL_TOLERANCE rtol=1e-2\n", "reason"),
    ("# NBVAL_TOLERANCE rtol=1e-2:   \n", "reason"),
    ("# NBVAL_TOLERANCE rtol=-1: why\n", ">= 0"),
    ("# NBVAL_TOLERANCE rtol=nan: why\n", "finite"),
    ("# NBVAL_TOLERANCE tol=1: why\n", "key"),
    ("# NBVAL_TOLERANCE rtol=1 rtol=2: why\n", "twice"),
    ("# NBVAL_TOLERANCE : why\n", "at least one"),
    ("# NBVAL_TOLERANCE rtol=1e-2: a\n# NBVAL_TOLERANCE atol=1: b\n", "one unscoped"),
    ("# NBVAL_TOLERANCE rtol=0.2: the whole cell\n", "must name the number"),
    ("# NBVAL_TOLERANCE image=13: a chaotic figure\n", "above 10"),
    ("# NBVAL_TOLERANCE rtol=1 on=x: a\n# NBVAL_TOLERANCE atol=1 on=x: b\n", "two markers"),
    ("# NBVAL_TOLERANCE image=3 on=x: a\n", "image= applies"),
    ("# NBVAL_TOLERANCE on=x: a\n", "at least one"),
    ("# NBVAL_TOLERANCE rtol=1 on=: a\n", "key=value"),
])
def test_bad_markers_raise(source, match):
    with pytest.raises(ValueError, match=match):
        parse_tolerance(source)


def test_scoped_tolerances_cover_only_their_lines_and_glue_keys():
    source = ("# NBVAL_TOLERANCE rtol=1e-3: float32 sums\n"
              "# NBVAL_TOLERANCE rtol=0.2 on=bf16_loss: one chaotic run\n"
              "# NBVAL_TOLERANCE atol=1e-12 on=ddp_gap: rounding error\n")
    tols = parse_tolerances(source)
    assert tols.default == Tolerance(rtol=1e-3, reason="float32 sums")
    assert [t.on for t in tols.scoped] == ["bf16_loss", "ddp_gap"]
    stored = "sum 1.0000\nbf16_loss = 2.49  (claim: < 3.3, margin 0.81)\nddp_gap = 3.6e-15\n"
    moved = "sum 1.0005\nbf16_loss = 2.63  (claim: < 3.3, margin 0.67)\nddp_gap = 4.4e-15\n"
    assert compare_text(stored, moved, tols).ok
    # the wide tolerance does not leak to the other lines
    assert not compare_text(stored, moved.replace("1.0005", "1.0050"), tols).ok
    assert not compare_text(stored, moved.replace("4.4e-15", "2.0e-12"), tols).ok
    assert not compare_text(stored, moved.replace("2.63", "1.63"), tols).ok
    glued = "application/papermill.record/text/plain"
    assert compare_value(f"{glued}#bf16_loss", "2.49", "2.63", tols).ok
    assert compare_value(f"{glued}#ch7_bf16_loss_mean", "2.49", "2.63", tols).ok
    assert not compare_value(f"{glued}#other_key", "2.49", "2.63", tols).ok
    assert not compare_value(glued, "2.49", "2.63", tols).ok


def _png(scale: float = 1.0, shift: float = 0.0, size=(4.0, 3.0)) -> str:
    fig, ax = plt.subplots(figsize=size, dpi=50)
    x = np.linspace(0, 1, 200)
    ax.plot(x, scale * np.sin(6 * x) + shift)
    ax.set_title("a curve")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def test_same_figure_passes_and_other_figures_fail():
    a = _png()
    assert image_rms(a, a) == 0.0
    assert compare_image(a, _png(), EXACT).ok                      # rendering is deterministic
    assert compare_image(a, _png(shift=1e-9), EXACT).ok            # rounding error in the data
    halved = compare_image(a, _png(scale=0.5), EXACT)
    assert not halved.ok and halved.image_rms > 10 * DEFAULT_IMAGE_RMS
    assert not compare_image(a, _png(size=(4.0, 3.2)), EXACT).ok   # another size
    assert compare_image(a, _png(scale=0.5), Tolerance(image=halved.image_rms, reason="t")).ok


def _run_notebook_test(path: Path, report: Path) -> subprocess.CompletedProcess:
    # The notebook lies outside the repository, so the root conftest.py that loads the
    # plugin is not read: load it by name, as the root conftest does.
    env = {**os.environ, "NBVAL_TOLERANT_REPORT": str(report),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tools"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
         "-p", "nbval_tolerant",
         "--rootdir", str(ROOT), "-c", str(ROOT / "pyproject.toml"), str(path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def executed_notebook(tmp_path_factory):
    """A two-cell notebook, executed once, with a number and a figure in its outputs."""
    from nbclient import NotebookClient

    folder = tmp_path_factory.mktemp("nb")
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("import math\nprint(f'pi is {math.pi:.4f}, 3 digits')"),
        nbformat.v4.new_code_cell("print(f'e is {math.e:.4f}, 3 digits')"),
        nbformat.v4.new_code_cell(
            "import matplotlib\nmatplotlib.use('module://matplotlib_inline.backend_inline')\n"
            "import matplotlib.pyplot as plt\nfig, ax = plt.subplots(figsize=(3, 2), dpi=50)\n"
            "ax.plot([0, 1, 2], [0, 1, 4]); ax.set_title('squares'); plt.show()"),
        nbformat.v4.new_code_cell(
            "import matplotlib.pyplot as plt\nfig, ax = plt.subplots(figsize=(3, 2), dpi=50)\n"
            "ax.bar([0, 1, 2], [3, 1, 2]); ax.set_title('bars'); plt.show()"),
    ]
    NotebookClient(nb, kernel_name="python3").execute()
    return nb, folder


def _write(nb, folder: Path, name: str) -> Path:
    path = folder / name
    nbformat.write(nb, path)
    return path


def test_end_to_end_unchanged_notebook_passes(executed_notebook, tmp_path):
    nb, folder = executed_notebook
    report = tmp_path / "report.jsonl"
    run = _run_notebook_test(_write(nb, folder, "same.ipynb"), report)
    assert run.returncode == 0, run.stdout[-3000:]
    records = [json.loads(line) for line in report.read_text().splitlines()]
    assert len(records) == 4 and all(r["ok"] for r in records)


def test_end_to_end_hand_edits_are_caught(executed_notebook, tmp_path):
    nb, folder = executed_notebook
    edited = nbformat.from_dict(json.loads(json.dumps(nb)))
    first, second = edited.cells[0].outputs[0], edited.cells[1].outputs[0]
    first.text = first.text.replace("3.1416", "1.5708")            # a halved number
    second.text = second.text.replace("3 digits", "4 digits")      # an edited exact output
    edited.cells[2].outputs = edited.cells[3].outputs              # another cell's figure
    run = _run_notebook_test(_write(edited, folder, "edited.ipynb"), tmp_path / "r.jsonl")
    assert "3 failed, 1 passed" in run.stdout, run.stdout[-3000:]
    assert "stored 1.5708, fresh 3.1416" in run.stdout
    assert "integer 4 became 3" in run.stdout
    assert "the figure changed" in run.stdout
