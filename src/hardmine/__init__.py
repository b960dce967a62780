"""hardmine: choose which examples an object detector trains on.

The names below are imported on first use (PEP 562), so that ``import hardmine.cli`` (and so
``hardmine --help``) does not pay for importing torch; ``from hardmine import OHEMSampler`` and
``hardmine.sample`` work as with eager imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hardmine.assign import ATSSAssigner, MaxIoUAssigner, assign_atss, assign_max_iou
    from hardmine.boxes import box_iof, box_iou
    from hardmine.sample import (
        SAMPLERS,
        IoUBalancedSampler,
        OHEMSampler,
        OverlapSampler,
        RandomSampler,
        sample_iou_balanced,
        sample_ohem,
        sample_overlap,
        sample_random,
    )
    from hardmine.structures import Assigner, Assignment, Sampler, Selection

# Public name -> the module that defines it.
_EXPORTS = {
    "ATSSAssigner": "hardmine.assign",
    "MaxIoUAssigner": "hardmine.assign",
    "assign_atss": "hardmine.assign",
    "assign_max_iou": "hardmine.assign",
    "box_iof": "hardmine.boxes",
    "box_iou": "hardmine.boxes",
    "SAMPLERS": "hardmine.sample",
    "IoUBalancedSampler": "hardmine.sample",
    "OHEMSampler": "hardmine.sample",
    "OverlapSampler": "hardmine.sample",
    "RandomSampler": "hardmine.sample",
    "sample_iou_balanced": "hardmine.sample",
    "sample_ohem": "hardmine.sample",
    "sample_overlap": "hardmine.sample",
    "sample_random": "hardmine.sample",
    "Assigner": "hardmine.structures",
    "Assignment": "hardmine.structures",
    "Sampler": "hardmine.structures",
    "Selection": "hardmine.structures",
}
# The subpackages that ``import hardmine`` used to load along with the names above.
_SUBMODULES = ("assign", "boxes", "sample", "structures")

__all__ = [
    "SAMPLERS",
    "ATSSAssigner",
    "Assigner",
    "Assignment",
    "IoUBalancedSampler",
    "MaxIoUAssigner",
    "OHEMSampler",
    "OverlapSampler",
    "RandomSampler",
    "Sampler",
    "Selection",
    "assign_atss",
    "assign_max_iou",
    "box_iof",
    "box_iou",
    "sample_iou_balanced",
    "sample_ohem",
    "sample_overlap",
    "sample_random",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # the next lookup does not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))
