"""Every method, preset and variant that the docstrings, the README and ``--help`` name exists and
is valid (defect D1: a docstring named a preset ``overlap_table2f`` that never existed)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hardmine.cli import build_parser
from hardmine.report.compare import default_compare_base
from hardmine.report.methods import check_method, known_methods, parse_methods

ROOT = Path(__file__).resolve().parents[2]
#: What follows ``--methods`` in prose and metavars, not method names.
PROSE = {"takes", "A,B", "A,B]"}


def _texts() -> dict[str, str]:
    texts = {str(p.relative_to(ROOT)): p.read_text() for p in (ROOT / "src").rglob("*.py")}
    texts["README.md"] = (ROOT / "README.md").read_text()
    parser = build_parser()
    for name, sub in parser._subparsers._group_actions[0].choices.items():  # type: ignore[union-attr]
        texts[f"hardmine {name} --help"] = sub.format_help()
    return texts


def _mentions() -> list[tuple[str, str]]:
    """``(where, spec list)`` for every ``--methods SPECS`` and every "preset ``NAME``"."""
    found = []
    for where, text in _texts().items():
        for match in re.finditer(r"--methods[ =]([A-Za-z0-9_.:=,\[\]-]+)", text):
            specs = match.group(1).rstrip(".,")
            if specs not in PROSE:
                found.append((where, specs))
        for match in re.finditer(r"preset[s]? `+([a-z0-9_]+)`+", text):
            found.append((where, match.group(1)))
    return found


def test_the_texts_name_methods_at_all() -> None:
    """The search below cannot pass by finding nothing."""
    where = {w for w, _ in _mentions()}
    assert "README.md" in where and "src/hardmine/sample/overlap.py" in where
    assert len(_mentions()) >= 10


@pytest.mark.parametrize(("where", "specs"), _mentions())
def test_every_named_method_exists_and_is_valid(where: str, specs: str) -> None:
    methods = parse_methods(specs)
    assert all(m.name.split(":")[0] in known_methods() for m in methods), where
    base = default_compare_base()
    for method in methods:
        check_method(method, base)
