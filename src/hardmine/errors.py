"""The project's own error types: what the command line reports as one line, and what it does not.

``HardmineError`` and its subclasses are a user's mistake (a bad file, a bad value, a missing run,
a changed configuration on ``--resume``) or a documented stop (a diverging run). Library code raises
them with the context already in the message (the file, the key, the image or annotation id), so
``hardmine.cli.main`` prints the message as one line on stderr and exits with ``exit_status``
(2 for a mistake), without a traceback. Anything else is a bug and keeps its traceback
(``HARDMINE_DEBUG=1`` shows one for these too).

This module imports nothing: every layer may raise these.
"""

from __future__ import annotations


class HardmineError(Exception):
    """A user's mistake or a documented stop; the message names the file / key / id.

    Attributes:
        exit_status: the command line's exit status for it (2: a user's mistake).
    """

    exit_status: int = 2


class ConfigError(HardmineError, ValueError):
    """A configuration names an unknown key or class, or gives a value of the wrong type or out of
    range; an option of the command line is out of range."""


class DataError(HardmineError, ValueError):
    """A data file (annotations, images, hard negatives) is missing, unreadable or malformed."""


class CheckpointError(HardmineError):
    """A checkpoint is missing, unreadable (truncated, empty, not a checkpoint) or does not fit the
    detector it is loaded into."""


class RunError(HardmineError):
    """A run directory is missing or not a run, or holds another run than the one asked for."""


class RunExistsError(RunError, FileExistsError):
    """The run directory already holds a run, and neither ``--resume`` nor another folder was
    chosen. Also a ``FileExistsError``, as before these types existed."""


class NonFiniteError(ValueError):
    """A tensor holds NaN or infinite values where finite ones are required.

    A ``ValueError`` for library callers (bad input); not a ``HardmineError``, because in training
    it means that the run diverged, which the training loop reports as such.
    """
