"""Samplers: which candidates the loss sees, and with what weight.

Each is a function ``sample_x`` plus a frozen ``XSampler`` dataclass in the ``Sampler`` interface,
all built on the one kernel in ``quota``. ``SAMPLERS`` maps configuration names to the classes.
``MinedNegativeSampler`` wraps any of them to give offline-mined hard negatives a share of the
picks. ``PISASampler`` (Prime Sample Attention) also states loss terms that the RoI heads apply in
the training pass (``PISALoss``).
"""

from hardmine.sample.iou_balanced import (
    IoUBalancedSampler,
    sample_instance_balanced,
    sample_iou_balanced,
)
from hardmine.sample.mined import MinedNegativeSampler, sample_with_mined
from hardmine.sample.ohem import OHEMSampler, sample_ohem
from hardmine.sample.overlap import OverlapSampler, overlap_with_positives, sample_overlap
from hardmine.sample.pisa import (
    PISALoss,
    PISASampler,
    carl_weights,
    isr_p_weights,
    nms_match,
    sample_pisa,
)
from hardmine.sample.random import RandomSampler, sample_random

SAMPLERS: dict[str, type] = {
    "random": RandomSampler,
    "ohem": OHEMSampler,
    "iou_balanced": IoUBalancedSampler,
    "overlap": OverlapSampler,
    "pisa": PISASampler,
}

__all__ = [
    "SAMPLERS",
    "IoUBalancedSampler",
    "MinedNegativeSampler",
    "OHEMSampler",
    "OverlapSampler",
    "PISALoss",
    "PISASampler",
    "RandomSampler",
    "carl_weights",
    "isr_p_weights",
    "nms_match",
    "overlap_with_positives",
    "sample_instance_balanced",
    "sample_iou_balanced",
    "sample_ohem",
    "sample_overlap",
    "sample_pisa",
    "sample_random",
    "sample_with_mined",
]
