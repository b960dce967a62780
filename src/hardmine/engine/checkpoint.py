"""Checkpoints written atomically, so that a run killed at any moment leaves a readable one.

The file goes through ``write_atomic`` (a temporary name in the same directory, synced, then
renamed over the old one), so a reader sees the old checkpoint or the new one, never half of one.
A write killed before the rename leaves its temporary file (``.checkpoint.pt.<random>.tmp``), which
``remove_stale_temporaries`` deletes when the run starts or resumes. A file that is nonetheless
unreadable (emptied, truncated, not a checkpoint) is refused by name (``CheckpointError``).
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import torch

from hardmine._atomic import write_atomic
from hardmine.errors import CheckpointError

CHECKPOINT_NAME = "checkpoint.pt"
#: What every checkpoint of ``hardmine train`` holds (``Session.state_dict``).
REQUIRED_KEYS = ("model", "optimizer", "scheduler", "generator", "rng", "position", "config")
log = logging.getLogger(__name__)


def save_atomic(state: dict[str, Any], path: str | Path) -> Path:
    """``torch.save`` ``state`` to ``path`` atomically.

    Returns:
        ``path``.
    """
    return write_atomic(path, lambda f: torch.save(state, f))


def load(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by ``save_atomic`` (tensors and plain data only).

    Raises:
        CheckpointError: the file is missing, empty, truncated or not a checkpoint (not a dict);
            the message names it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    if path.stat().st_size == 0:
        raise CheckpointError(
            f"{path}: the checkpoint is empty (0 bytes); delete it to start afresh"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch.load raises many types for a damaged file; all mean that
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        if isinstance(error, pickle.UnpicklingError) or "Weights only load failed" in reason:
            # Not PyTorch's advice to load it with weights_only=False: that runs the file's code.
            raise CheckpointError(
                f"{path}: not a hardmine checkpoint (it holds Python objects other than tensors "
                "and plain data, which are not loaded: unpickling them could run code)"
            ) from error
        raise CheckpointError(
            f"{path}: not a readable checkpoint (truncated or damaged? {reason})"
        ) from error
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a hardmine checkpoint (a {type(state).__name__})")
    return state


def remove_stale_temporaries(folder: str | Path, names: tuple[str, ...]) -> list[Path]:
    """Delete the temporary files that killed atomic writes of ``names`` left in ``folder``.

    Call it only where no other process is writing those files (a run starting or resuming).

    Returns:
        The files removed.
    """
    removed = []
    for name in names:
        for tmp in Path(folder).glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
            log.info("removed %s, left by a write that was killed", tmp)
    return removed
