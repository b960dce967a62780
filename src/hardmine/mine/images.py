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
from pathlib import Path

import torch
from torch import nn

from hardmine._atomic import check_writable
from hardmine.data import HardNegatives, ImageFolder, save_hard_negatives
from hardmine.engine.distributed import resolve_device
from hardmine.engine.rundir import load_run
from hardmine.mine.detections import check_overwrite, detect, mine_detections, warn_unfinished
from hardmine.mine.falsepos import ImageDetections

#: ``hardmine mine --images``'s file in the run directory, beside the dataset's.
FOLDER_NEGATIVES_NAME = "hard_negatives_images.json"


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
    detections = detect(model, folder, device=device, batch_size=batch_size, desc="mining")
    # No ground truth: every detection is a false positive, and the IoU threshold is moot.
    mined = mine_detections(detections, top_k=top_k, score_thr=score_thr, source=source)
    hard = HardNegatives(
        images=mined.images,
        source=mined.source,
        settings=mined.settings,
        file_names={d.image_id: folder.path_of(d.image_id) for d in detections},
        folder=str(folder.root.resolve()),
        digests={d.image_id: folder.digest(d.image_id - folder.ids[0]) for d in detections},
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


def mine_images(
    run_dir: str | Path,
    images: str | Path,
    *,
    output: str | Path | None = None,
    device: str = "auto",
    top_k: int | None = None,
    score_thr: float | None = None,
    batch_size: int = 4,
    fp_score: float = 0.5,
) -> tuple[Path, HardNegatives, float]:
    """``hardmine mine --images``: mine a run's detector on a folder of images without objects.

    Args:
        run_dir: the run directory.
        images: the folder (searched recursively; ``hardmine.data.folder``).
        output: the hard-negatives file; ``RUN_DIR/hard_negatives_images.json`` by default.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        top_k: at most this many per image.
        score_thr: only detections scoring at least this.
        batch_size: images per forward pass.
        fp_score: the score at which false positives per image are counted.

    Returns:
        The file's path, its contents, and the false positives per image at ``fp_score``.

    Raises:
        RunError: ``output`` holds other mining (other settings or another folder), or is not a
            hard-negatives file: it is not overwritten.
        DataError: the folder is missing, holds no image, or a file that cannot be decoded.
    """
    path = Path(output) if output is not None else Path(run_dir) / FOLDER_NEGATIVES_NAME
    settings = {"iou_thr": 0.5, "top_k": top_k, "score_thr": score_thr}
    check_overwrite(path, settings, folder=str(Path(images).resolve()))
    check_writable(path.parent, f"--output {path}")
    resolved = resolve_device(device)
    run = load_run(run_dir, device=resolved)
    warn_unfinished(run)
    folder = ImageFolder(
        images, categories=run.categories, check_images=run.config.data.check_images
    )
    hard, detections = mine_folder(
        run.model,
        folder,
        device=resolved,
        top_k=top_k,
        score_thr=score_thr,
        batch_size=batch_size,
        source=str(run_dir),
    )
    return save_hard_negatives(hard, path), hard, fp_per_image_at_score(detections, fp_score)
