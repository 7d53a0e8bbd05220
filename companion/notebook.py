"""The one call that opens every chapter (book: Introduction, "Running the book").

::

    from companion.notebook import setup
    device = setup(seed=0)

seeds Python, NumPy and PyTorch (:func:`companion.device.seed_everything`), sets the
book's figure style (:func:`companion.plotting.use_book_style`), picks the device
(:func:`companion.device.get_device`: CUDA, then Apple's MPS, then the CPU, or what
``COMPANION_DEVICE`` says) and prints what it chose, so that a reader sees at the top of
every chapter on what the numbers below were computed.
"""

from __future__ import annotations

import torch

from companion._validate import check_int
from companion.device import get_device, seed_everything
from companion.plotting import use_book_style


def setup(seed: int = 0) -> torch.device:
    """Seed everything with ``seed``, set the figure style, return the device; print them.

    The printed line reads ``set-up: seed 0, device cpu, 1 CPU thread``. Under ``make
    test`` each notebook kernel uses one CPU thread; in your own Jupyter session PyTorch
    uses one per core.
    """
    check_int("seed", seed, low=0)
    seed_everything(seed)
    use_book_style()
    device = get_device()
    threads = torch.get_num_threads()
    print(f"set-up: seed {seed}, device {device}, {threads} CPU thread{'s' * (threads != 1)}")
    return device
