"""companion.notebook: setup (seeds, style, device; says what it chose) and glue."""

from __future__ import annotations

import random

import matplotlib as mpl
import numpy as np
import pytest
import torch

from companion.notebook import glue, setup


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


@pytest.mark.parametrize("display", [False, True])
@pytest.mark.parametrize("value", [0.123, "3.5 s", 42, [1, 2]])
def test_glue_emits_what_myst_nb_glue_emits(monkeypatch, value, display):
    """The book's build reads our glued outputs as MyST-NB's: same bundle, same metadata."""
    myst_glue = pytest.importorskip("myst_nb.ext.glue")
    import IPython.display

    calls = []
    record = lambda obj, **kw: calls.append((obj, kw))  # noqa: E731
    monkeypatch.setattr(IPython.display, "display", record)
    monkeypatch.setattr(myst_glue, "ipy_display", record)
    glue("key", value, display=display)
    myst_glue.glue("key", value, display=display)
    assert len(calls) == 2 and calls[0] == calls[1]
    assert calls[0][1]["metadata"]["scrapbook"]["name"] == "key"


def test_glue_checks_its_name():
    with pytest.raises(TypeError, match="name"):
        glue(3, 1.0)
