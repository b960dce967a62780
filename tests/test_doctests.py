"""The ``Example:`` blocks of the public samplers, assigners and box operations run as doctests."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "hardmine.boxes",
    "hardmine.assign.atss",
    "hardmine.assign.max_iou",
    "hardmine.sample.iou_balanced",
    "hardmine.sample.mined",
    "hardmine.sample.ohem",
    "hardmine.sample.overlap",
    "hardmine.sample.pisa",
    "hardmine.sample.random",
]


@pytest.mark.parametrize("name", MODULES)
def test_examples(name: str) -> None:
    module = importlib.import_module(name)
    # An empty namespace: each Example imports what it uses, so a reader can paste it (D17).
    result = doctest.testmod(module, globs={}, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
    assert result.attempted > 0  # the module has examples


def test_every_public_sampler_and_assigner_has_an_example() -> None:
    import hardmine.assign
    import hardmine.sample

    functions = [
        getattr(package, name)
        for package in (hardmine.sample, hardmine.assign)
        for name in package.__all__
        if name.startswith(("sample_", "assign_"))
    ]
    assert len(functions) >= 8
    missing = [f.__name__ for f in functions if "Example:" not in (f.__doc__ or "")]
    assert not missing, missing
