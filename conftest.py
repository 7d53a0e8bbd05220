"""Repository-wide pytest set-up, loaded for unit tests and notebooks alike.

* One CPU thread per process. This runs before torch is imported and is inherited by
  the notebook kernels that nbval starts. `make test` runs two pytest processes on a
  2-core machine; with PyTorch's default of one thread per core they would
  oversubscribe the cores and spin, which slows small models tenfold. `make notebooks`
  stores outputs with the same setting, so stored and fresh outputs come from the same
  arithmetic however pytest is invoked (`pytest`, `pytest book/`, one notebook).
* The stored outputs were produced on the CPU with ``PYTHONHASHSEED=0``. Both are set
  here as defaults for the notebook kernels (the Makefile sets them too), so that a
  plain ``pytest`` on a machine with a GPU still compares CPU results with CPU results.
  An explicit ``COMPANION_DEVICE=cuda pytest book/`` runs the notebooks on the GPU, where
  the printed digits of trained models may differ from the stored ones.
* nbval's comparison is replaced by ``tools/nbval_tolerant.py``: text exactly, integers
  exactly, other numbers to the printed digits or to the tolerance a cell declares with
  ``# NBVAL_TOLERANCE``, figures by their RMS pixel difference.
* After the run, the terminal summary lists how long each notebook took under nbval
  (kernel start included), slowest first, and the ten slowest cells: the book's budget
  is 45 s per notebook on a 2-core CPU. It is a report, not a test: timings vary by
  machine. With ``NOTEBOOK_TIMINGS=path.json`` the same goes into a file (``.ci/run``
  prints a summary of its stages from these).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("COMPANION_DEVICE", "cpu")
os.environ.setdefault("PYTHONHASHSEED", "0")

# nbval compares outputs through the plugin tools/nbval_tolerant.py (tools/ is on the
# path through pyproject.toml's `pythonpath`): numbers to the tolerance a cell declares
# (default: the printed digits), figures by RMS pixel difference.
pytest_plugins = ["nbval_tolerant"]

_notebook_seconds: dict[str, float] = defaultdict(float)
_cell_seconds: dict[str, float] = {}


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::")[0]
    if path.endswith(".ipynb"):
        _notebook_seconds[path] += report.duration
        if report.when == "call":
            _cell_seconds[report.nodeid] = report.duration


def pytest_terminal_summary(terminalreporter):
    """Notebook wall times and the ten slowest cells; also as JSON if NOTEBOOK_TIMINGS is set.

    Under ``pytest -n`` each worker's reports reach the controller, so this sees them all.
    """
    if not _notebook_seconds:
        return
    notebooks = sorted(_notebook_seconds.items(), key=lambda kv: -kv[1])
    cells = sorted(_cell_seconds.items(), key=lambda kv: -kv[1])[:10]
    terminalreporter.section("notebook wall time under nbval (budget: 45 s each on 2 CPU cores)")
    for path, seconds in notebooks:
        terminalreporter.write_line(f"{seconds:7.1f} s  {path}")
    terminalreporter.section("the ten slowest notebook cells")
    for nodeid, seconds in cells:
        terminalreporter.write_line(f"{seconds:7.1f} s  {nodeid}")
    target = os.environ.get("NOTEBOOK_TIMINGS")
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text(json.dumps({"notebooks": dict(notebooks),
                                            "slowest_cells": dict(cells)}, indent=1))
