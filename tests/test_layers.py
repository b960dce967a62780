"""The direction of imports (REDESIGN.md): no module imports one of a higher layer.

core (``boxes``, ``structures``, ``assign``, ``sample``) < ``data`` < ``models``; core < ``config``;
``engine`` builds on all of them; ``mine`` and ``report`` sit on top; ``cli`` is the entry point.
Each package is imported, every module of it, in a fresh interpreter, and the modules it loaded
are checked.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HIGHER = {
    "hardmine.sample": ("data", "models", "config", "engine", "mine", "report", "cli"),
    "hardmine.assign": ("data", "models", "config", "engine", "mine", "report", "cli"),
    "hardmine.data": ("models", "config", "engine", "mine", "report", "cli"),
    "hardmine.models": ("config", "engine", "mine", "report", "cli"),
    "hardmine.config": ("data", "models", "engine", "mine", "report", "cli"),
    "hardmine.engine": ("mine", "report", "cli"),
    "hardmine.mine": ("report", "cli"),
    "hardmine.report": ("mine", "cli"),
}

_PROBE = """
import importlib, json, pkgutil, sys
package = importlib.import_module(sys.argv[1])
for info in pkgutil.walk_packages(getattr(package, "__path__", []), package.__name__ + "."):
    importlib.import_module(info.name)
print(json.dumps(sorted(m for m in sys.modules if m.startswith("hardmine"))))
"""


@pytest.mark.parametrize("package", sorted(HIGHER))
def test_no_module_imports_a_higher_layer(package: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, package], capture_output=True, text=True, check=True
    )
    loaded = json.loads(out.stdout)
    assert package in loaded
    upward = [m for m in loaded if m.split(".")[1:2] and m.split(".")[1] in HIGHER[package]]
    assert not upward, f"importing {package} loaded {upward}"
