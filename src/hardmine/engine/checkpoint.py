"""Checkpoints written atomically, so that a run killed at any moment leaves a readable one.

The file is written to a temporary name in the same directory and then renamed over the old one
(``os.replace`` is atomic on POSIX and Windows), so a reader sees the old checkpoint or the new
one, never half of one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "checkpoint.pt"


def save_atomic(state: dict[str, Any], path: str | Path) -> Path:
    """``torch.save`` ``state`` to ``path`` through a temporary file and ``os.replace``.

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by ``save_atomic`` (tensors and plain data only)."""
    return torch.load(Path(path), map_location=map_location, weights_only=True)
