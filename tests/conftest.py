"""Shared pytest set-up: the CUDA marker, a ``device`` fixture, and notebook timings.

* Tests marked ``@pytest.mark.cuda`` (or parametrised with :data:`DEVICES`) are
  skipped when no CUDA GPU is present, and run when one is.
* After the run, the terminal summary lists how long each notebook took under
  nbval (kernel start included), slowest first: the book's budget is 60 s per
  notebook on a 2-core CPU. It is a report, not a test: timings vary by machine.
"""

from __future__ import annotations

import os

# One CPU thread per process, set before torch is imported here and inherited by the
# notebook kernels that nbval starts. pytest runs two processes on a 2-core machine; with
# PyTorch's default of one thread per core they would oversubscribe the cores and spin,
# which slows small models tenfold. `make notebooks` stores outputs with the same
# setting, so stored and fresh outputs come from the same arithmetic.
os.environ["OMP_NUM_THREADS"] = "1"

from collections import defaultdict  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

#: Parametrise a test over these to run it on the CPU and, when present, on CUDA.
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is present")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


_notebook_seconds: dict[str, float] = defaultdict(float)


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::")[0]
    if path.endswith(".ipynb"):
        _notebook_seconds[path] += report.duration


def pytest_terminal_summary(terminalreporter):
    if not _notebook_seconds:
        return
    terminalreporter.section("notebook wall time under nbval (budget: 60 s each on 2 CPU cores)")
    for path, seconds in sorted(_notebook_seconds.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"{seconds:7.1f} s  {path}")
