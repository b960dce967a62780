"""Progress of a long loop: a tqdm bar on a terminal, a few log lines otherwise.

``hardmine eval > log 2>&1`` (or a batch job) has no terminal to draw a bar on, and would show
nothing until the end: there, ``progress`` logs a line at every tenth of the way and one at the
end, through the ``hardmine`` logger (the command line shows its INFO lines on stderr).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
log = logging.getLogger(__name__)


def progress(
    items: Iterable[T], *, total: int | None, desc: str, unit: str = "batches"
) -> Iterator[T]:
    """Yield ``items``, showing how far the loop has come.

    Args:
        items: what the loop goes over.
        total: how many there are (None: unknown; lines then come every 10 items).
        desc: what the loop does ("evaluating"), the start of every line.
        unit: what an item is, in the lines.
    """
    if sys.stderr.isatty():
        yield from tqdm(items, total=total, desc=desc, unit=unit[:-1], dynamic_ncols=True)
        return
    start, done, next_line = time.monotonic(), 0, 1
    step = max(1, total // 10) if total else 10
    for item in items:
        yield item
        done += 1
        if done >= next_line * step and done != total:
            shown = f"{done}/{total}" if total else str(done)
            log.info("%s: %s %s, %.1f s", desc, shown, unit, time.monotonic() - start)
            next_line += 1
    log.info("%s: %d %s done in %.1f s", desc, done, unit, time.monotonic() - start)
