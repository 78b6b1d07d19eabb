"""Every runnable docstring example in the package runs and holds (the examples are part of the docs)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import repguard

MODULES = sorted(m.name for m in pkgutil.walk_packages(repguard.__path__, "repguard."))
_FINDER = doctest.DocTestFinder()


def _has_examples(name: str) -> bool:
    return any(t.examples for t in _FINDER.find(importlib.import_module(name)))


WITH_EXAMPLES = [name for name in MODULES if _has_examples(name)]


@pytest.mark.parametrize("name", WITH_EXAMPLES)
def test_docstring_examples_hold(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


@pytest.mark.parametrize("name", MODULES)
def test_every_module_imports(name):
    """Each module of the package imports on its own (optional frameworks are installed in the test venv)."""
    assert importlib.import_module(name).__name__ == name


def test_the_core_carries_runnable_examples():
    attempted = {}
    for name in ("repguard.config", "repguard.rollback", "repguard.request_guard"):
        attempted[name] = doctest.testmod(importlib.import_module(name)).attempted
    assert all(attempted.values()), attempted
