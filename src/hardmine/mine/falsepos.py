"""False positives of a detector: which to mine as hard negatives, and how many per image it makes.

Offline bootstrapping (Sung & Poggio, 1998; Dalal & Triggs, CVPR 2005; Felzenszwalb et al.,
PAMI 2010) trains a detector, runs it over the training images, and adds the detections that hit
no object to the negatives of the next round. ``false_positives`` picks those detections;
``fp_per_image_at_recall`` measures how many a detector makes, the number bootstrapping lowers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from hardmine.boxes import box_iof, box_iou, check_boxes, check_finite, upcast


@dataclass(frozen=True)
class ImageDetections:
    """One image's detections beside its ground truth, in the image's own pixel coordinates.

    Attributes:
        image_id: the image's id in the dataset's ``coco_gt``.
        boxes: ``float [D, 4]`` detections, xyxy.
        scores: ``float [D]``.
        labels: ``int64 [D]`` predicted classes (1-based).
        gt_boxes: ``float [G, 4]``.
        gt_labels: ``int64 [G]``.
        ignore_boxes: ``float [K, 4]`` regions (COCO ``iscrowd``) that count as neither.
    """

    image_id: int
    boxes: Tensor
    scores: Tensor
    labels: Tensor
    gt_boxes: Tensor
    gt_labels: Tensor
    ignore_boxes: Tensor


def _image_index(sizes: Sequence[int], device: torch.device) -> Tensor:
    """``int64 [sum(sizes)]``: the image each row of a concatenation belongs to."""
    return torch.repeat_interleave(
        torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device)
    )


def _max_over_image(flat: Tensor, image: Tensor, others: Sequence[Tensor], *, iof: bool) -> Tensor:
    """Each row of ``flat: [N, 4]``'s largest IoU (or IoF) with the ``others`` of its image.

    The others are padded to ``[B, M_max, 4]`` with zero-area boxes, whose IoU and IoF with
    anything are 0, the floor of the maximum anyway.
    """
    if flat.shape[0] == 0 or max((o.shape[0] for o in others), default=0) == 0:
        return flat.new_zeros(flat.shape[0])
    # Padded in float32 at least: half-precision detections must not round the ground truths.
    dtype = upcast(flat[:0]).dtype
    padded = pad_sequence([upcast(o).to(dtype) for o in others], batch_first=True)  # [B, M_max, 4]
    overlap = box_iof if iof else box_iou
    return overlap(flat[:, None], padded[image])[:, 0].amax(1)  # [N, 1, M_max] -> [N]


def false_positives(
    images: Sequence[ImageDetections],
    *,
    iou_thr: float = 0.5,
    ignore_iof_thr: float = 0.5,
    top_k: int | None = None,
    score_thr: float | None = None,
) -> list[Tensor]:
    """The detections to mine as hard negatives: those that hit no object, by a strategy.

    A detection is a false positive when its IoU with *every* ground truth of its image, of any
    class, is below ``iou_thr``. Class-agnostic on purpose: mined boxes join the RoI candidates as
    background, and a box over an object of another class is no background (the assigner, which
    is class-agnostic too, would label it positive for that object). A detection more than
    ``ignore_iof_thr`` covered by an ignore region is not a false positive either: it is the
    assigner's rule for ignoring candidates, so mining it would contradict the annotation.

    Of the false positives, the strategies of the bootstrapping literature keep those scoring at
    least ``score_thr`` and, of these, the ``top_k`` highest-scoring per image (ties to the lower
    index). Neither given keeps all.

    All images are handled at once (ground truths padded to the batch maximum); the result is for
    writing to a file, so it is index lists, not masks.

    Args:
        images: one per image.
        iou_thr: a detection overlapping a ground truth by this much is not a false positive.
        ignore_iof_thr: nor one covered by an ignore region by more than this.
        top_k: keep at most this many per image.
        score_thr: keep only those scoring at least this.

    Returns:
        Per image, ``int64 [M_i]`` indices into its detections, highest score first.

    Raises:
        ValueError: on non-finite boxes or scores, sizes that disagree, or a negative ``top_k``.
    """
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not images:
        return []
    for i, im in enumerate(images):
        for name in ("boxes", "gt_boxes", "ignore_boxes"):
            check_boxes(getattr(im, name), f"images[{i}].{name}")
        if im.scores.shape != (im.boxes.shape[0],):
            raise ValueError(
                f"images[{i}].scores: expected shape [{im.boxes.shape[0]}], got "
                f"{list(im.scores.shape)}"
            )
        check_finite(im.scores, f"images[{i}].scores")
    sizes = [im.boxes.shape[0] for im in images]
    boxes = torch.cat([im.boxes for im in images])  # [N, 4]
    scores = torch.cat([im.scores for im in images])  # [N]
    image = _image_index(sizes, boxes.device)  # [N]

    iou = _max_over_image(boxes, image, [im.gt_boxes for im in images], iof=False)
    iof = _max_over_image(boxes, image, [im.ignore_boxes for im in images], iof=True)
    keep = (iou < iou_thr) & (iof <= ignore_iof_thr)
    if score_thr is not None:
        keep &= scores >= score_thr
    keys = torch.where(keep, scores, float("-inf"))

    # The kept ones, highest score first within each image (ties to the lower index), images in
    # order; then ``top_k`` is a cut on each one's rank within its image.
    order = torch.argsort(keys, descending=True, stable=True)
    order = order[torch.argsort(image[order], stable=True)]
    order = order[keep[order]]
    kept_image = image[order]
    counts = torch.bincount(kept_image, minlength=len(images))  # [B]
    rank = (
        torch.arange(order.numel(), device=order.device) - (counts.cumsum(0) - counts)[kept_image]
    )
    if top_k is not None:
        order, kept_image = order[rank < top_k], kept_image[rank < top_k]
        counts = counts.clamp(max=top_k)
    size = torch.tensor(sizes, device=order.device)
    local = order - (size.cumsum(0) - size)[kept_image]
    return list(local.split(counts.tolist()))


def _match_image(im: ImageDetections, *, iou_thr: float, ignore_iof_thr: float) -> np.ndarray:
    """Greedy COCO-style matching of one image: ``int8 [D]``, 1 true positive, 0 false positive,
    -1 neither (in an ignore region), in descending score order (``argsort``, stable).

    Each detection, highest score first, takes the unmatched ground truth of its class that it
    overlaps most, if by at least ``iou_thr``.
    """
    order = torch.argsort(im.scores, descending=True, stable=True)
    iou = box_iou(im.boxes[order], im.gt_boxes).cpu().numpy()  # [D, G], float32 at least
    same = (im.labels[order, None] == im.gt_labels[None, :]).cpu().numpy()  # [D, G]
    candidate = np.where(same & (iou >= iou_thr), iou, -1.0)
    ignored = np.zeros(len(order), dtype=bool)
    if im.ignore_boxes.shape[0]:
        iof = box_iof(im.boxes[order], im.ignore_boxes)
        ignored = (iof.amax(1) > ignore_iof_thr).cpu().numpy()
    outcome = np.zeros(len(order), dtype=np.int8)
    taken = np.zeros(iou.shape[1], dtype=bool)
    for d in range(len(order)):  # greedy: each match depends on the earlier ones
        row = np.where(taken, -1.0, candidate[d])
        if row.size and row.max() >= 0:
            taken[row.argmax()] = True
            outcome[d] = 1
        elif ignored[d]:
            outcome[d] = -1
    return outcome


def fp_per_image_at_recall(
    images: Sequence[ImageDetections],
    *,
    recall: float = 0.5,
    iou_thr: float = 0.5,
    ignore_iof_thr: float = 0.5,
) -> float:
    """False positives per image at the score threshold where the detector reaches ``recall``.

    The operating point of pedestrian detection's miss rate against false positives per image
    (Dollár et al., PAMI 2012), pooled over classes: detections are matched greedily per image as
    COCO does at one IoU threshold (a detection is a true positive when it takes an unmatched
    ground truth of its class with IoU >= ``iou_thr``; duplicates and wrong classes are false
    positives; unmatched detections more than ``ignore_iof_thr`` inside an ignore region count as
    neither), then all detections of the dataset are sorted by score and the false positives are
    counted down to the first one at which the true positives reach ``recall`` of all ground
    truths. ``recall`` defaults to 0.5, which a briefly trained detector reaches; the numbers of
    two detectors compare only at the same recall.

    Args:
        images: every image of the dataset, those without detections included (they count in the
            per-image mean).
        recall: the fixed recall, in ``(0, 1]``.
        iou_thr: the matching threshold.
        ignore_iof_thr: coverage by an ignore region above which an unmatched detection is ignored.

    Returns:
        False positives per image; ``math.inf`` when the detector never reaches ``recall``.

    Raises:
        ValueError: ``recall`` outside ``(0, 1]``, or no ground truth at all.
    """
    if not 0.0 < recall <= 1.0:
        raise ValueError(f"recall must be in (0, 1], got {recall}")
    num_gt = sum(im.gt_boxes.shape[0] for im in images)
    if num_gt == 0:
        raise ValueError("no ground truth in any image: recall is undefined")
    outcomes, scores = [], []
    for im in images:
        outcomes.append(_match_image(im, iou_thr=iou_thr, ignore_iof_thr=ignore_iof_thr))
        scores.append(torch.sort(im.scores, descending=True, stable=True).values.cpu().numpy())
    outcome, score = np.concatenate(outcomes), np.concatenate(scores)
    order = np.argsort(-score, kind="stable")
    cum_tp = np.cumsum(outcome[order] == 1)
    cum_fp = np.cumsum(outcome[order] == 0)
    # Integer comparison, so that recall 0.5 of 3 objects needs 2 true positives, exactly.
    reached = np.flatnonzero(cum_tp >= math.ceil(recall * num_gt - 1e-9))
    if reached.size == 0:
        return math.inf
    return float(cum_fp[reached[0]]) / len(images)
