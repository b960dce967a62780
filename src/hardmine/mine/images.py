"""Mining a folder of images without objects: every detection there is a false positive.

Classic bootstrapping (Sung & Poggio, 1998; Dalal & Triggs, CVPR 2005; the practice the
``papers/hard_examples_and_bootstrapping.txt`` notes describe: "pick a limited number of false
positives per image or ... only pick a false positive if its score is superior to a fixed
threshold (0.5 for instance)") scans images known to hold none of the classes and keeps the
detector's highest-scoring detections as hard negatives. ``mine_folder`` does that on an
``ImageFolder`` (``top_k`` per image and / or ``score_thr``) and records the images' paths
(hard-negatives file version 2), so that training matches the boxes to the images by path
(``hardmine.data.folder.NegativeImageMix``). ``fp_per_image_at_score`` is the quantity
bootstrapping lowers: detections per object-free image scoring at least a fixed score.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from hardmine.data import HardNegatives
from hardmine.data.folder import ImageFolder
from hardmine.mine.falsepos import ImageDetections
from hardmine.mine.run import detect, mine_detections


def mine_folder(
    model: nn.Module,
    folder: ImageFolder,
    *,
    device: torch.device | str,
    top_k: int | None = None,
    score_thr: float | None = None,
    batch_size: int = 4,
    source: str = "",
) -> tuple[HardNegatives, list[ImageDetections]]:
    """Run ``model`` over ``folder`` and keep its detections as hard negatives, by path.

    Args:
        model: a trained torchvision detector.
        folder: the images without objects.
        device: where the model runs.
        top_k: at most this many per image, the highest-scoring.
        score_thr: only those scoring at least this.
        batch_size: images per forward pass.
        source: recorded in the file (the run directory).

    Returns:
        The hard negatives (with ``file_names`` and ``folder``: a version 2 file), and every
        detection (for ``fp_per_image_at_score``).
    """
    detections = detect(model, folder, device=device, batch_size=batch_size)
    # No ground truth: every detection is a false positive, and the IoU threshold is moot.
    mined = mine_detections(detections, top_k=top_k, score_thr=score_thr, source=source)
    hard = HardNegatives(
        images=mined.images,
        source=mined.source,
        settings=mined.settings,
        file_names={d.image_id: folder.path_of(d.image_id) for d in detections},
        folder=str(folder.root),
    )
    return hard, detections


def fp_per_image_at_score(detections: Sequence[ImageDetections], score: float) -> float:
    """Detections scoring at least ``score`` per image, over images without objects.

    On such images each detection is a false positive, so this is the false-positive rate per
    image at the operating point ``score`` (pedestrian detection's "false positives per image",
    Dollár et al., PAMI 2012, at a fixed threshold rather than a fixed recall: there is no recall
    on images without objects).

    Raises:
        ValueError: no images.
    """
    if not detections:
        raise ValueError("no images to count false positives on")
    return sum(int((d.scores >= score).sum()) for d in detections) / len(detections)
