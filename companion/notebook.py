"""The one call that opens every chapter (book: Introduction, "Running the book").

::

    from companion.notebook import setup
    device = setup(seed=0)

seeds Python, NumPy and PyTorch (:func:`companion.device.seed_everything`), sets the
book's figure style (:func:`companion.plotting.use_book_style`), picks the device
(:func:`companion.device.get_device`: CUDA, then Apple's MPS, then the CPU, or what
``COMPANION_DEVICE`` says) and prints what it chose, so that a reader sees at the top of
every chapter on what the numbers below were computed.

:func:`glue` stores a value for the prose (``{glue:text}`key```), as MyST-NB's ``glue``
does, without importing MyST-NB: a notebook then runs without the ``book`` extra, and its
kernel skips the 1--2 s that importing ``nbformat``'s JSON-schema validator costs.
"""

from __future__ import annotations

import torch

from companion._optional import require
from companion._validate import check_int, check_type
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


#: The MIME prefix that marks a glued output MyST-NB does not display (``display=False``).
GLUE_PREFIX = "application/papermill.record/"


def glue(name: str, variable, display: bool = True) -> None:
    """Glue ``variable`` under ``name`` for ``{glue:text}`name``` in the book's prose.

    Emits what MyST-NB's ``myst_nb.glue`` emits -- the value's display data, with
    ``{"scrapbook": {"name": name, "mime_prefix": prefix}}`` in the metadata, the MIME
    types prefixed by :data:`GLUE_PREFIX` when ``display`` is false -- so the book's
    build reads it the same way (a test compares the two).
    """
    check_type("name", name, str)
    formatters = require("IPython.core.formatters")  # IPython: the `book` extra
    show = require("IPython.display").display
    bundle, metadata = formatters.format_display_data(variable)
    prefix = "" if display else GLUE_PREFIX
    metadata["scrapbook"] = {"name": name, "mime_prefix": prefix}
    show({prefix + mime: data for mime, data in bundle.items()}, raw=True, metadata=metadata)
