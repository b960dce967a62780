"""hardmine: choose which examples an object detector trains on."""

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
