"""Assigners: label every candidate positive, negative or ignore, with its ground truth.

Each is a function ``assign_x`` plus a frozen ``XAssigner`` dataclass in the ``Assigner``
interface; ``ASSIGNERS`` maps configuration names to the classes.
"""

from hardmine.assign.atss import ATSSAssigner, assign_atss
from hardmine.assign.max_iou import MaxIoUAssigner, assign_max_iou

ASSIGNERS: dict[str, type] = {"max_iou": MaxIoUAssigner, "atss": ATSSAssigner}

__all__ = ["ASSIGNERS", "ATSSAssigner", "MaxIoUAssigner", "assign_atss", "assign_max_iou"]
