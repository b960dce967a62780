"""The one atomic file writer: every file hardmine writes goes through ``write_atomic``.

A reader (or a run killed at any moment) sees the old file or the new one, never half of one: the
content goes to a temporary file in the same folder, is flushed and synced to disk, and then
renamed over the target (``os.replace`` is atomic on POSIX and Windows).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from hardmine.errors import RunError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

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

    The missing folders are made and removed again (the proof that they can be: ``/proc/x``, a
    name longer than the file system allows, a full disk), so that a refused command leaves
    nothing behind.

    Raises:
        RunError: an empty path, a file on the way, a folder without write permission, or a
            folder that cannot be made (the system's reason).
    """
    if not str(folder).strip():
        raise RunError(f"{name.rstrip()}: an empty path; give a folder")
    existing = Path(folder)
    missing = []
    while not existing.exists() and existing != existing.parent:
        missing.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        raise RunError(f"{name}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunError(f"{name}: {existing} is not writable")
    made = []
    try:
        for path in reversed(missing):
            path.mkdir()
            made.append(path)
    except FileExistsError:  # made meanwhile (by another process): it is there to write to
        pass
    except OSError as error:
        raise RunError(f"{name}: cannot make {error.filename or path}: {error.strerror}") from None
    finally:
        for path in reversed(made):
            with contextlib.suppress(OSError):
                path.rmdir()


#: The file whose lock ``hold_folder`` takes, in the folder it holds.
LOCK_NAME = ".hardmine.lock"


@contextlib.contextmanager
def hold_folder(folder: str | Path, name: str, command: str) -> Iterator[None]:
    """Hold ``folder`` for this process, or raise ``RunError`` if another holds it.

    Two commands writing into one folder at once train the same runs twice over, each
    appending to the other's files. The lock is ``flock`` on ``folder / LOCK_NAME`` (made, with
    ``folder``, if missing), without waiting: the system lets it go when this process ends,
    however it ends (a killed process holds nothing). A folder made here that holds nothing else
    at the end (a command refused in its own checks) is removed again. Where ``fcntl`` is missing
    (Windows), nothing is locked.

    Args:
        folder: the folder (checked by ``check_writable`` before).
        name: what the user gave, for the message (``"--output runs/x"``).
        command: what holds it, for the message (``"hardmine compare"``).

    Raises:
        RunError: another process holds ``folder``.
    """
    if fcntl is None:
        yield
        return
    path = Path(folder) / LOCK_NAME
    made = not path.parent.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
    except OSError as error:
        raise RunError(f"{name}: cannot make {error.filename or path}: {error.strerror}") from None
    held = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunError(
                f"{name}: another {command} is using {folder} (it holds {LOCK_NAME} there, as "
                "do for a few seconds the data-loading workers of one just killed); wait for it "
                "to end, or choose another folder"
            ) from None
        held = True
        yield
    finally:
        if made and held:  # while held: no other process has this file open to lock it
            with contextlib.suppress(OSError):
                if [p.name for p in path.parent.iterdir()] == [LOCK_NAME]:
                    path.unlink()
                    path.parent.rmdir()
        os.close(fd)  # lets the lock go


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
