"""Tests of code with a C extension run both ways: compiled, and the pure-Python fallback."""

from __future__ import annotations

import pytest


def with_and_without_c(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, module: object, name: str
) -> None:
    """For a fixture with params ``["compiled", <fallback>]``: the fallback param sets ``module.name``
    (what the code takes from a C extension) to None, so the pure-Python path runs; the compiled
    param is skipped where the extension was not built."""
    if request.param != "compiled":
        monkeypatch.setattr(module, name, None)
    elif getattr(module, name) is None:
        pytest.skip("the C extension was not built (no compiler)")
