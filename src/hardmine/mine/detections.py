"""A detector's detections over a dataset, and its false positives as a hard-negatives file's
contents: the mining that ``hardmine mine`` and ``hardmine bootstrap`` do, on a dataset's images
(``mine``) or on a folder of images without objects (``hardmine.mine.images``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from hardmine.config import describe_differences
from hardmine.data import HardNegatives, HardNegativesFormatError, MinedBoxes, load_hard_negatives
from hardmine.engine.evaluate import detect as detect_outputs
from hardmine.engine.rundir import RESULTS_NAME, LoadedRun
from hardmine.errors import RunError
from hardmine.mine.falsepos import ImageDetections, false_positives

log = logging.getLogger(__name__)


def detect(
    model: nn.Module,
    dataset: Dataset,
    *,
    device: torch.device | str,
    batch_size: int = 4,
    desc: str | None = None,
) -> list[ImageDetections]:
    """Run a torchvision detector over ``dataset`` in eval mode; detections beside ground truth.

    The model is put back in its previous mode afterwards (``hardmine.engine.evaluate.detect``).

    Args:
        model: a torchvision detector whose labels are the dataset's.
        dataset: a dataset of the common interface (``hardmine.data``).
        device: where the model runs.
        batch_size: images per forward pass.
        desc: show the loop's progress under this name.

    Returns:
        One ``ImageDetections`` per image, on the CPU, in dataset order.
    """
    return [
        ImageDetections(
            image_id=int(target["image_id"]),
            boxes=output["boxes"].float().cpu(),
            scores=output["scores"].float().cpu(),
            labels=output["labels"].cpu(),
            gt_boxes=target["boxes"],
            gt_labels=target["labels"],
            ignore_boxes=target.get("ignore_boxes", torch.zeros(0, 4)),
        )
        for target, output in detect_outputs(
            model, dataset, device=device, batch_size=batch_size, desc=desc
        )
    ]


def mine_detections(
    detections: Sequence[ImageDetections],
    *,
    iou_thr: float = 0.5,
    top_k: int | None = None,
    score_thr: float | None = None,
    source: str = "",
) -> HardNegatives:
    """The false positives among ``detections`` (see ``false_positives``), as a file's contents.

    Every image gets an entry, those without false positives too.
    """
    kept = false_positives(detections, iou_thr=iou_thr, top_k=top_k, score_thr=score_thr)
    images = {
        d.image_id: MinedBoxes(boxes=d.boxes[k], scores=d.scores[k], labels=d.labels[k])
        for d, k in zip(detections, kept, strict=True)
    }
    settings = {"iou_thr": iou_thr, "top_k": top_k, "score_thr": score_thr}
    return HardNegatives(images=images, source=source, settings=settings)


def mine(
    model: nn.Module,
    dataset: Dataset,
    *,
    device: torch.device | str,
    iou_thr: float = 0.5,
    top_k: int | None = None,
    score_thr: float | None = None,
    batch_size: int = 4,
    source: str = "",
) -> HardNegatives:
    """Run ``model`` over ``dataset`` (its training set) and keep its false positives.

    Args:
        model: a trained torchvision detector.
        dataset: the images to mine, with their ground truth.
        device: where the model runs.
        iou_thr: a detection overlapping any ground truth by this much is not mined.
        top_k: at most this many per image, the highest-scoring.
        score_thr: only those scoring at least this.
        batch_size: images per forward pass.
        source: recorded in the file (the run directory).
    """
    detections = detect(model, dataset, device=device, batch_size=batch_size, desc="mining")
    return mine_detections(
        detections, iou_thr=iou_thr, top_k=top_k, score_thr=score_thr, source=source
    )


def warn_unfinished(run: LoadedRun) -> None:
    """Warn, in one line, that ``run`` has not finished (no ``results.json``): its detector is
    that of its last checkpoint, mid-schedule."""
    if not (run.run_dir / RESULTS_NAME).exists():
        log.warning(
            "%s has not finished (no %s): mining the detector of its checkpoint at step %d",
            run.run_dir,
            RESULTS_NAME,
            run.step,
        )


def _absolute(folder: str) -> str:
    return str(Path(folder).resolve()) if folder else ""


def check_overwrite(path: Path, settings: Mapping[str, Any], *, folder: str = "") -> None:
    """Refuse to replace ``path`` unless it is a hard-negatives file mined with ``settings`` (on
    ``folder``, for a folder's file): mining again with the same settings gives the same file."""
    if not path.exists():
        return
    try:
        hard = load_hard_negatives(path)
    except HardNegativesFormatError:
        raise RunError(f"{path} exists and is not a hard-negatives file; not overwritten") from None
    old = dict(hard.settings)
    # The folder as an absolute path (an older file's relative one taken from here): the same
    # folder reached from another working folder is the same.
    if _absolute(hard.folder) != _absolute(folder):
        mined_on = f"the folder {hard.folder}" if hard.folder else "a dataset's images"
        raise RunError(
            f"{path} holds hard negatives mined on {mined_on}, which a run may have trained on; "
            "choose another --output, or delete it"
        )
    if old != dict(settings):
        changed = [
            (f"--{k.replace('_', '-')}", old.get(k), v)
            for k, v in settings.items()
            if old.get(k) != v
        ]
        raise RunError(
            f"{path} holds hard negatives mined with other settings "
            f"({describe_differences(changed)}), which a run may have trained on; choose another "
            "--output, or delete it"
        )
