"""Offline hard negative mining: bootstrapping rounds for deep detectors.

Mine a trained detector's false positives on its training images (``false_positives``, written by
``save_hard_negatives``), train again with them among the RoI candidates as background
(``HardNegativeDataset`` adds them to the targets, ``MinedNegativeSampler`` guarantees them a share
of the negative picks), and repeat (``hardmine.mine.run.bootstrap``). ``hardmine.mine.run`` is not
imported here: it needs the training harness, which itself imports this package's sampler.
"""

from hardmine.mine.dataset import HardNegativeDataset, with_hard_negatives
from hardmine.mine.falsepos import ImageDetections, false_positives, fp_per_image_at_recall
from hardmine.mine.file import (
    HardNegatives,
    HardNegativesFormatError,
    MinedBoxes,
    load_hard_negatives,
    save_hard_negatives,
)
from hardmine.mine.sampler import MinedNegativeSampler, append_hard_negatives, sample_with_mined

__all__ = [
    "HardNegativeDataset",
    "HardNegatives",
    "HardNegativesFormatError",
    "ImageDetections",
    "MinedBoxes",
    "MinedNegativeSampler",
    "append_hard_negatives",
    "false_positives",
    "fp_per_image_at_recall",
    "load_hard_negatives",
    "sample_with_mined",
    "save_hard_negatives",
    "with_hard_negatives",
]
