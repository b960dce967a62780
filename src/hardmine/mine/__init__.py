"""Offline hard negative mining: bootstrapping rounds for deep detectors.

Mine a trained detector's false positives on its training images (``false_positives``; the file
is ``hardmine.data.hard_negatives``), train again with them among the RoI candidates as background
(``hardmine.data.HardNegativeDataset`` adds them to the targets,
``hardmine.sample.MinedNegativeSampler`` guarantees them a share of the negative picks), and
repeat (``bootstrap``). This package sits on top of the harness: nothing below imports it.
"""

from hardmine.mine.falsepos import ImageDetections, false_positives, fp_per_image_at_recall
from hardmine.mine.run import (
    RoundResult,
    bootstrap,
    detect,
    format_rounds,
    mine,
    mine_detections,
    mine_run,
)

__all__ = [
    "ImageDetections",
    "RoundResult",
    "bootstrap",
    "detect",
    "false_positives",
    "format_rounds",
    "fp_per_image_at_recall",
    "mine",
    "mine_detections",
    "mine_run",
]
