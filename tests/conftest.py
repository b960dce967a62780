"""Every test keeps hardmine's file-check records in its own temporary folder, not ``~/.cache``
(subprocesses inherit the variable)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path_factory.mktemp("hardmine-cache")
    monkeypatch.setenv("HARDMINE_CACHE_DIR", str(path))
    return path
