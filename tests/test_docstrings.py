"""The examples in the package's docstrings (``>>>`` lines) run and print what they say."""

import doctest
import importlib
import pkgutil

import pytest

import companion

MODULES = sorted(info.name for info in pkgutil.iter_modules(companion.__path__))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(f"companion.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
