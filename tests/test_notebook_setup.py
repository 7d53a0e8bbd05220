"""companion.notebook.setup: seeds, style and device in one call that says what it chose."""

from __future__ import annotations

import random

import matplotlib as mpl
import numpy as np
import pytest
import torch

from companion.notebook import setup


def test_setup_seeds_styles_and_prints_the_device(capsys, monkeypatch):
    monkeypatch.setenv("COMPANION_DEVICE", "cpu")
    mpl.rcdefaults()
    device = setup(seed=3)
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    assert device == torch.device("cpu")
    out = capsys.readouterr().out
    threads = torch.get_num_threads()
    assert out == f"set-up: seed 3, device cpu, {threads} CPU thread{'s' * (threads != 1)}\n"
    assert mpl.rcParams["axes.grid"], "the book's style (whitegrid) was not set"
    setup(seed=3)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first
    setup(seed=4)
    assert torch.rand(1).item() != first[2]


@pytest.mark.parametrize("seed", [-1, 1.5, True, "0"])
def test_setup_rejects_bad_seeds(seed):
    with pytest.raises((TypeError, ValueError), match="seed"):
        setup(seed=seed)
