"""The examples in chipscale's docstrings run: a docstring that shows a call and its answer
is a promise (mercantile's and rio-tiler's style), so it is checked like one. Only the modules
whose source shows an example are cases, and each must run at least one."""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pkgutil
from pathlib import Path

import pytest

import chipscale


def _modules_with_examples() -> list[str]:
    """Every module under chipscale/ (found by walking the package, so moved or new modules
    count) whose source holds a `>>>` prompt. Modules are not imported to decide:
    `chipscale.cli.__main__` runs the CLI when imported."""
    found = []
    for info in pkgutil.walk_packages(chipscale.__path__, "chipscale."):
        spec = importlib.util.find_spec(info.name)
        origin = spec.origin if spec is not None else None
        if origin and origin.endswith(".py") and ">>>" in Path(origin).read_text():
            found.append(info.name)
    return sorted(found)


MODULES = _modules_with_examples()


def test_examples_are_found() -> None:
    # A walk that finds nothing would make the parametrized test below vacuous.
    assert "chipscale.values" in MODULES and len(MODULES) > 10, MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, report=False)
    assert result.attempted > 0, f"{name} shows `>>>` but doctest found no example to run"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {name} failed"
