"""The package declares what it imports, and a missing optional package names its extra.

``pyproject.toml`` lists the runtime dependencies and the extras (serve, export, tokens,
oracles, test, book, browser). These tests read the package's source with ``ast`` and
check that every third-party module it imports is declared there, and import every
module of ``companion`` in a fresh interpreter in which the optional packages cannot be
imported -- as after a plain ``pip install .`` -- where each module must either import or
fail with an ImportError that names the extra to install.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from companion._optional import EXTRA

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

#: imported only inside Jupyter and guarded by ``except ImportError``; ipykernel brings them
GUARDED = {"IPython", "matplotlib_inline"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared(requirements: list[str]) -> set[str]:
    return {_norm(re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0]) for r in requirements}


def _third_party_imports() -> dict[str, set[str]]:
    """``{top-level module: {files importing it}}`` over the package, stdlib excluded."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / "companion").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "require"
                  and node.args and isinstance(node.args[0], ast.Constant)):
                names = [node.args[0].value]
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "companion":
                    found.setdefault(top, set()).add(path.name)
    return found


def test_every_imported_package_is_declared():
    base = _declared(PYPROJECT["dependencies"])
    extras = {k: _declared(v) for k, v in PYPROJECT["optional-dependencies"].items()}
    distributions = importlib.metadata.packages_distributions()
    undeclared = []
    for module, files in sorted(_third_party_imports().items()):
        if module in GUARDED:
            continue
        dists = {_norm(d) for d in distributions.get(module, [module])}
        if dists & base:
            continue
        extra = EXTRA.get(module)
        if extra is None or not dists & extras.get(extra, set()):
            undeclared.append(f"{module} (imported by {sorted(files)}; "
                              f"_optional.EXTRA says {extra!r})")
    assert not undeclared, "imported but not declared in pyproject.toml: " + "; ".join(undeclared)


def test_optional_modules_are_not_runtime_dependencies():
    base = _declared(PYPROJECT["dependencies"])
    distributions = importlib.metadata.packages_distributions()
    for module in EXTRA:
        dists = {_norm(d) for d in distributions.get(module, [module])}
        assert not dists & base, f"{module} is a runtime dependency; drop it from EXTRA"


_PROBE = r"""
import importlib, importlib.abc, json, pkgutil, sys
blocked = set(json.loads(sys.argv[1]))

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Block())
for m in list(sys.modules):
    if m.split(".")[0] in blocked:
        del sys.modules[m]
import companion
results = {}
for info in pkgutil.walk_packages(companion.__path__, "companion."):
    for m in [m for m in sys.modules if m.startswith("companion.")]:
        del sys.modules[m]
    try:
        importlib.import_module(info.name)
        results[info.name] = "ok"
    except ImportError as err:
        results[info.name] = str(err)
print(json.dumps(results))
"""


def test_every_module_imports_or_names_its_extra_without_the_optional_packages():
    blocked = sorted(EXTRA)
    out = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(blocked)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, check=True).stdout
    results = json.loads(out.splitlines()[-1])
    assert len(results) >= 25, results
    bad = {m: r for m, r in results.items() if r != "ok" and "extra" not in r}
    assert not bad, f"modules that fail without naming an extra: {bad}"


def test_no_module_imports_another_modules_private_name():
    """Shared helpers live under public names in private modules (``_validate``,
    ``_optional``, ``metrics._common``); no module reaches into another's ``_name``."""
    private = []
    for path in sorted((ROOT / "companion").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (
                    node.level or "companion" in (node.module or "")):
                private += [f"{path.relative_to(ROOT)}: {node.module}.{a.name}"
                            for a in node.names if a.name.startswith("_")]
    assert not private, private


def test_one_bool_is_not_an_int_check():
    """"A bool is not an int" is written once, in ``_validate`` (and ``check_type``): every
    other module calls ``check_int``/``check_number``/``is_integer``/``is_real``."""
    copies = []
    for path in sorted((ROOT / "companion").rglob("*.py")):
        if path.name == "_validate.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"isinstance\(\w+, bool\)", line):
                copies.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not copies, "\n".join(copies)
