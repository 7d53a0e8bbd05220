"""Choosing a device and making runs repeatable (book: Introduction, "Running the book").

Every notebook starts with ``device = setup(seed=0)`` (:mod:`companion.notebook`), which
calls both of these::

    seed_everything(0)
    device = get_device()

``get_device`` picks the fastest available backend (CUDA, then Apple's MPS, then
the CPU); the environment variable ``COMPANION_DEVICE`` overrides that choice, so
the same notebook can be forced onto the CPU with ``COMPANION_DEVICE=cpu``.
"""

from __future__ import annotations

import os
import random
import sys

import numpy as np
import torch

from companion._validate import check_int

ENV_VAR = "COMPANION_DEVICE"
_KNOWN_TYPES = ("cpu", "cuda", "mps")


def _available(device_type: str) -> bool:
    if device_type == "cuda":
        return torch.cuda.is_available()
    if device_type == "mps":
        return torch.backends.mps.is_available()
    return device_type == "cpu"


def _parse(value: str | torch.device, source: str) -> torch.device:
    """Turn ``value`` into a ``torch.device`` that exists on this machine."""
    if not isinstance(value, (str, torch.device)):
        raise TypeError(f"{source} must be a str or torch.device, got {type(value).__name__}")
    try:
        device = torch.device(value)
    except RuntimeError as err:
        raise ValueError(
            f"{source}={value!r} is not a device; expected one of {_KNOWN_TYPES}, "
            "optionally with an index such as 'cuda:1'"
        ) from err
    if device.type not in _KNOWN_TYPES:
        raise ValueError(f"{source}={value!r}: device type must be one of {_KNOWN_TYPES}")
    if not _available(device.type):
        raise ValueError(f"{source}={value!r}, but {device.type} is not available on this machine")
    if device.type == "cuda" and device.index is not None:
        if device.index >= torch.cuda.device_count():
            raise ValueError(
                f"{source}={value!r}, but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    return device


def get_device(prefer: str | torch.device | None = None) -> torch.device:
    """Return the device the book's code runs on.

    Order of precedence: the ``prefer`` argument, then the ``COMPANION_DEVICE``
    environment variable, then the first available of CUDA, MPS and CPU.

    Parameters
    ----------
    prefer:
        A device such as ``"cpu"``, ``"cuda"`` or ``"cuda:1"``. It must exist on
        this machine; asking for a missing backend raises ``ValueError`` rather
        than silently falling back.

    Returns
    -------
    torch.device
    """
    if prefer is not None:
        return _parse(prefer, "prefer")
    from_env = os.environ.get(ENV_VAR, "").strip()
    if from_env:
        return _parse(from_env, ENV_VAR)
    for device_type in ("cuda", "mps"):
        if _available(device_type):
            return torch.device(device_type)
    return torch.device("cpu")


def _deterministic_algorithms(mode: bool) -> None:
    """``torch.use_deterministic_algorithms(mode, warn_only=True)`` without its import of
    TorchInductor (seconds of CPU in every notebook that never compiles anything).

    The public function sets two things: the ATen flag, set here through the same
    ``torch._C`` call, and ``torch._inductor.config.deterministic``, set here directly if
    TorchInductor is already imported, and otherwise through the environment variable
    that its config reads when it is first imported (``TORCHINDUCTOR_DETERMINISTIC``).
    A test checks that both end as the public function leaves them.
    """
    inductor = sys.modules.get("torch._inductor.config")
    if inductor is not None:
        inductor.deterministic = mode
    else:
        os.environ["TORCHINDUCTOR_DETERMINISTIC"] = "1" if mode else "0"
    torch._C._set_deterministic_algorithms(mode, warn_only=mode)


def seed_everything(seed: int, deterministic: bool = True) -> int:
    """Seed Python, NumPy and PyTorch (CPU and every CUDA device) with ``seed``.

    With ``deterministic=True`` PyTorch is also asked for deterministic kernels
    (``torch.use_deterministic_algorithms(True, warn_only=True)``, cuDNN's
    deterministic mode, and the cuBLAS workspace setting that CUDA needs for it),
    so that a notebook gives the same numbers every time it runs on the same
    machine, and float32 convolutions on a GPU keep float32's precision
    (``torch.backends.cudnn.allow_tf32 = False``: cuDNN would otherwise use TF32, a
    10-bit mantissa, on recent NVIDIA GPUs; float32 matrix products already keep it by
    PyTorch's default). Results still differ in the last bits between a CPU and a GPU, or
    between different numbers of CPU threads: the book prints rounded numbers.

    Returns the seed, so that it can be recorded.
    """
    seed = check_int("seed", seed, low=0, high=2**32 - 1)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        # cuBLAS reads this when it is first initialised; harmless on the CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        _deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.allow_tf32 = False
    else:
        _deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.allow_tf32 = True  # PyTorch's default
    return seed
