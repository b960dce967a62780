"""hardmine: choose which examples an object detector trains on."""

from hardmine.boxes import box_iof, box_iou
from hardmine.sample.random import RandomSampler, sample_random
from hardmine.structures import Assigner, Assignment, Sampler, Selection

__all__ = [
    "Assigner",
    "Assignment",
    "RandomSampler",
    "Sampler",
    "Selection",
    "box_iof",
    "box_iou",
    "sample_random",
]
__version__ = "0.1.0"
