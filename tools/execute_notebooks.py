"""Re-execute notebooks in place so that their stored outputs are fresh (``make notebooks``).

Usage: ``python tools/execute_notebooks.py [NOTEBOOK ...]`` (default: every notebook
under ``book/``). Each notebook runs in a fresh kernel with its own folder as the
working directory -- exactly as nbval runs it -- and is written back with outputs,
execution counts 1, 2, 3, ..., no timing metadata, and consecutive prints of a cell
merged into one stream output (how the kernel splits them depends on flush timing), so
that a re-run that changes nothing leaves every compared output as it was (cells marked
``# NBVAL_IGNORE_OUTPUT`` print fresh timings). Prints the wall time of each.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent


# The kernels inherit these: one CPU thread, the CPU, a fixed hash seed -- exactly as
# under `make test` (conftest.py).
os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("COMPANION_DEVICE", "cpu")
os.environ.setdefault("PYTHONHASHSEED", "0")


def merge_streams(outputs: list) -> list:
    """Join consecutive stream outputs of the same name (stdout, stderr) into one."""
    merged = []
    for out in outputs:
        previous = merged[-1] if merged else None
        if (out.output_type == "stream" and previous is not None
                and previous.output_type == "stream" and previous.name == out.name):
            previous.text += out.text
        else:
            merged.append(out)
    return merged


def execute(path: Path) -> float:
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.outputs = merge_streams(cell.outputs)
    nb.metadata.pop("widgets", None)
    nbformat.write(nb, path)
    return seconds


def main(argv: list[str]) -> int:
    paths = [Path(p) for p in argv] or sorted((ROOT / "book").rglob("*.ipynb"))
    paths = [p for p in paths if ".ipynb_checkpoints" not in p.parts]
    for path in paths:
        seconds = execute(path)
        print(f"{seconds:6.1f} s  {path.relative_to(ROOT) if path.is_absolute() else path}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
