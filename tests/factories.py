"""Small objects that many test files build: one tiny GPT and one digits split.

Imported by the test modules (``from factories import tiny_gpt``); pytest puts
``tests/`` on ``sys.path``. Each factory is seeded, so that a test gets the same weights
or the same split every run.
"""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch

from companion.data import load_digits_split
from companion.transformer import GPT, GPTConfig


def tiny_gpt(vocab_size: int = 11, block_size: int = 16, *, n_layer: int = 2, n_head: int = 2,
             n_embd: int = 16, seed: int = 0, dtype: torch.dtype = torch.float64,
             device: str | torch.device = "cpu", **config) -> GPT:
    """A GPT small enough to run in milliseconds, initialised after ``manual_seed(seed)``.

    float64 by default, so that comparisons with an oracle can be tight; ``**config``
    goes to :class:`~companion.transformer.GPTConfig` (``dropout``, ``position_encoding``).
    """
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer,
                       n_head=n_head, n_embd=n_embd, **config)
    return GPT(config).to(device, dtype)


@functools.cache
def digits_split(dtype: torch.dtype = torch.float32):
    """scikit-learn's digits, split and scaled as the book does (cached: read once)."""
    return load_digits_split(dtype=dtype)


def assert_refused(load, record: dict, *changes, tmp_path, match: str = "re-record"):
    """Each ``change`` applied to a copy of ``record``, written to disk, is refused by
    ``load(path)`` with a ValueError matching ``match`` (a record's settings check)."""
    for change in changes:
        changed = copy.deepcopy(record)
        change(changed)
        path = tmp_path / "changed.json"
        path.write_text(json.dumps(changed))
        with pytest.raises(ValueError, match=match):
            load(path)
