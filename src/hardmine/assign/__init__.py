"""Assigners: label every candidate positive, negative or ignore, with its ground truth."""

from hardmine.assign.atss import ATSSAssigner, assign_atss
from hardmine.assign.max_iou import MaxIoUAssigner, assign_max_iou

__all__ = ["ATSSAssigner", "MaxIoUAssigner", "assign_atss", "assign_max_iou"]
