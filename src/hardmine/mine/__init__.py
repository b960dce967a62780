"""Offline hard negative mining: bootstrapping rounds for deep detectors.

Mine a trained detector's false positives on its training images (``false_positives``; the file
is ``hardmine.data.hard_negatives``), train again with them among the RoI candidates as background
(``hardmine.data.HardNegativeDataset`` adds them to the targets,
``hardmine.sample.MinedNegativeSampler`` guarantees them a share of the negative picks), and
repeat (``bootstrap``). Or mine a folder of images that hold none of the classes
(``mine_folder``, ``hardmine.mine.images``): they join the training set as images without objects,
their mined boxes as background (``hardmine.data.NegativeImageMix``). This package sits on top of
the harness: nothing below imports it.
"""

from hardmine.mine.detections import detect, mine, mine_detections
from hardmine.mine.falsepos import ImageDetections, false_positives, fp_per_image_at_recall
from hardmine.mine.images import fp_per_image_at_score, mine_folder, mine_images
from hardmine.mine.run import RoundResult, bootstrap, format_rounds, mine_run

__all__ = [
    "ImageDetections",
    "RoundResult",
    "bootstrap",
    "detect",
    "false_positives",
    "format_rounds",
    "fp_per_image_at_recall",
    "fp_per_image_at_score",
    "mine",
    "mine_detections",
    "mine_folder",
    "mine_images",
    "mine_run",
]
