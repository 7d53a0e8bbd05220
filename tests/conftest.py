"""Unit-test set-up: the CUDA marker and a ``device`` fixture.

Tests marked ``@pytest.mark.cuda`` (or parametrised with :data:`DEVICES`, as the
``device`` fixture is) are skipped when no CUDA GPU is present, and run when one is.
The thread setting and the notebook timings live in the repository's root conftest.py.
"""

from __future__ import annotations

import pytest
import torch

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
