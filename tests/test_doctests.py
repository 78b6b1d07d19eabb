"""Every runnable docstring example in the package runs and holds (the examples are part of the docs)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import repguard

MODULES = sorted(m.name for m in pkgutil.walk_packages(repguard.__path__, "repguard."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_hold(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


def test_the_core_carries_runnable_examples():
    attempted = {}
    for name in ("repguard.config", "repguard.rollback", "repguard.request_guard"):
        attempted[name] = doctest.testmod(importlib.import_module(name)).attempted
    assert all(attempted.values()), attempted
