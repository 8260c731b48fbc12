"""The examples in chipscale's docstrings run: a docstring that shows a call and its answer
is a promise (mercantile's and rio-tiler's style), so it is checked like one."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import chipscale

MODULES = sorted(m.name for m in pkgutil.walk_packages(chipscale.__path__, "chipscale."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, report=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {name} failed"
