"""The one atomic file writer: every file hardmine writes goes through ``write_atomic``.

A reader (or a run killed at any moment) sees the old file or the new one, never half of one: the
content goes to a temporary file in the same folder, is flushed and synced to disk, and then
renamed over the target (``os.replace`` is atomic on POSIX and Windows).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from hardmine.errors import RunError

# The permissions of a file created by open(): 0o666 less the process's umask (mkstemp's own
# 0o600 would leave checkpoints and hard-negative files readable by their owner only).
_UMASK = os.umask(0)
os.umask(_UMASK)


def check_writable(folder: str | Path, name: str) -> None:
    """Raise ``RunError`` unless ``folder`` is, or can be made, a folder this process writes to.

    Every command checks where it writes before any work, so that an unwritable location is one
    line at the start, not a traceback after the work (``write_atomic`` creates missing parents).

    Args:
        folder: where the files will go.
        name: what the user gave, for the message (``"--output runs/x"``, ``"output_dir runs/x"``).

    Raises:
        RunError: an empty path, a file on the way, or a folder without write permission.
    """
    if not str(folder).strip():
        raise RunError(f"{name.rstrip()}: an empty path; give a folder")
    existing = Path(folder)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise RunError(f"{name}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunError(f"{name}: {existing} is not writable")


def write_atomic(path: str | Path, content: bytes | str | Callable[[BinaryIO], None]) -> Path:
    """Write ``content`` to ``path`` atomically, creating the parent folders.

    Args:
        path: the target; replaced if it exists.
        content: the bytes, the text (UTF-8), or a function that writes to a binary file object
            (``torch.save``, ``Figure.savefig``).

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(content, str):
                f.write(content.encode("utf-8"))
            elif isinstance(content, bytes):
                f.write(content)
            else:
                content(f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
