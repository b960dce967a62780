"""Checkpoints written atomically, so that a run killed at any moment leaves a readable one.

The file goes through ``write_atomic`` (a temporary name in the same directory, synced, then
renamed over the old one), so a reader sees the old checkpoint or the new one, never half of one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hardmine._atomic import write_atomic

CHECKPOINT_NAME = "checkpoint.pt"


def save_atomic(state: dict[str, Any], path: str | Path) -> Path:
    """``torch.save`` ``state`` to ``path`` atomically.

    Returns:
        ``path``.
    """
    return write_atomic(path, lambda f: torch.save(state, f))


def load(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by ``save_atomic`` (tensors and plain data only)."""
    return torch.load(Path(path), map_location=map_location, weights_only=True)
