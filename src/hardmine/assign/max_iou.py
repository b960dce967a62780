"""Max-IoU assignment: the R-CNN family's rule (Girshick, "Fast R-CNN", ICCV 2015; Ren et al.,
"Faster R-CNN", NeurIPS 2015), with torchvision's ``Matcher`` semantics for low-quality matches.

Each candidate takes the ground truth it overlaps most; its IoU with it decides positive, negative
or ignore. The whole batch is one ``[B, G, N]`` computation (ground truths and candidates padded to
the batch maxima), cut into chunks over ``G`` so that memory stays bounded with many ground truths.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from hardmine.assign._batch import DEFAULT_CHUNK_SIZE, prepare_batch
from hardmine.boxes import box_iou
from hardmine.structures import IGNORE, NEGATIVE, POSITIVE, Assignment


def _neg_range(neg_thr: float | tuple[float, float], pos_thr: float) -> tuple[float, float]:
    lo, hi = (0.0, neg_thr) if isinstance(neg_thr, (int, float)) else neg_thr
    if not 0.0 <= lo <= hi <= pos_thr:
        raise ValueError(
            f"need 0 <= neg_lo <= neg_hi <= pos_thr, got neg_thr={neg_thr}, pos_thr={pos_thr}"
        )
    return lo, hi


def assign_max_iou(
    candidates: Sequence[Tensor],
    gt_boxes: Sequence[Tensor],
    gt_labels: Sequence[Tensor],
    *,
    pos_thr: float = 0.5,
    neg_thr: float | tuple[float, float] = 0.5,
    low_quality: bool = False,
    ignore_boxes: Sequence[Tensor] | None = None,
    ignore_iof_thr: float = 0.5,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> list[Assignment]:
    """Label each candidate by its best IoU with the image's ground truths.

    Every candidate takes the ground truth it overlaps most (the first on ties). It is positive
    where that IoU ``>= pos_thr``, negative where it lies in ``[neg_lo, neg_hi)``, ignored otherwise
    (between the thresholds, and below ``neg_lo``). Fast R-CNN uses ``pos_thr=0.5`` and
    ``neg_thr=(0.1, 0.5)``; torchvision's RoI heads ``0.5`` and ``0.5``; its RPN ``0.7`` and ``0.3``
    with low-quality matches.

    Low-quality matches follow torchvision's ``Matcher(allow_low_quality_matches=True)``: for every
    ground truth, each candidate whose IoU equals that ground truth's highest IoU (ties included)
    becomes positive, matched to *its own* best ground truth (which is usually that one; on a tie
    or when another ground truth overlaps the candidate more, the better one, as torchvision does).
    Unlike torchvision, a ground truth that overlaps no candidate at all (highest IoU 0) yields no
    match, so one far-off ground truth cannot turn every candidate positive.

    Ignore regions follow MMDetection's ``MaxIoUAssigner``: a candidate whose IoF with an ignore
    box (the fraction of the candidate covered) exceeds ``ignore_iof_thr`` is ignored *before*
    positive assignment, so it is never positive, and it is left out of the low-quality rule (a
    ground truth whose best candidate is ignored matches its best remaining candidate). Unlike
    MMDetection, ignore regions also apply in images without ground truth.

    An image without ground truth has every candidate negative (apart from ignore regions), with
    ``gt_index`` 0 and ``max_iou`` 0. Zero-area and out-of-image boxes need no care: their IoU is 0.

    Args:
        candidates: per image ``float [N_i, 4]`` proposals or anchors, ``xyxy``.
        gt_boxes: per image ``float [G_i, 4]``.
        gt_labels: per image ``int [G_i]`` classes (1-based; 0 is background).
        pos_thr: positive at IoU ``>=`` this.
        neg_thr: negative at IoU in ``[0, neg_thr)``, or in ``[lo, hi)`` for a pair ``(lo, hi)``.
        low_quality: add torchvision's low-quality matches (Faster R-CNN's RPN rule that every
            ground truth gets its best anchor).
        ignore_boxes: per image ``float [K_i, 4]`` regions (e.g. COCO crowd boxes), or ``None``.
        ignore_iof_thr: IoF above which a candidate is ignored.
        chunk_size: ground truths per chunk of the ``[B, G, N]`` computation; smaller bounds memory
            with many ground truths, the result is the same.

    Returns:
        One ``Assignment`` per image (DESIGN.md conventions); ``max_iou`` has the candidates'
        dtype.

    Raises:
        ValueError: on non-finite boxes, mismatched inputs or inconsistent thresholds.
    """
    neg_lo, neg_hi = _neg_range(neg_thr, pos_thr)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if len(candidates) == 0:
        return []
    batch = prepare_batch(candidates, gt_boxes, gt_labels, ignore_boxes, ignore_iof_thr)
    cand, gts = batch.candidates, batch.gt_boxes
    best_iou = cand.new_full(cand.shape[:2], -1.0)  # [B, N]
    best_gt = torch.zeros(cand.shape[:2], dtype=torch.int64, device=cand.device)  # [B, N]
    low_quality_match = torch.zeros_like(batch.ignored)  # [B, N]
    for start in range(0, gts.shape[1], chunk_size):
        valid = batch.gt_valid[:, start : start + chunk_size, None]  # [B, C, 1]
        # Padded ground truths get IoU -1 so that they never win a max.
        iou = box_iou(gts[:, start : start + chunk_size], cand).masked_fill(~valid, -1.0)
        value, index = iou.max(dim=1)  # [B, N]
        better = value > best_iou  # strict: the earlier chunk keeps ties, as one global max would
        best_iou = torch.where(better, value, best_iou)
        best_gt = torch.where(better, index + start, best_gt)
        if low_quality and cand.shape[1]:
            eligible = iou.masked_fill(batch.ignored[:, None, :], -1.0)  # [B, C, N]
            gt_best = eligible.amax(dim=2, keepdim=True)  # [B, C, 1]; padded candidates have 0
            is_best = (eligible == gt_best) & (gt_best > 0)
            low_quality_match |= is_best.any(dim=1)

    max_iou = best_iou.clamp(min=0)  # -1 only in images without ground truth
    positive = (max_iou >= pos_thr) | low_quality_match
    negative = (max_iou >= neg_lo) & (max_iou < neg_hi)
    label = torch.where(positive, POSITIVE, torch.where(negative, NEGATIVE, IGNORE))
    label = torch.where(batch.has_gt, label, NEGATIVE)
    label = torch.where(batch.ignored, IGNORE, label).to(torch.int8)  # [B, N]
    return batch.split(label, best_gt, max_iou)


@dataclass(frozen=True)
class MaxIoUAssigner:
    """``assign_max_iou`` with its settings, in the ``Assigner`` interface."""

    pos_thr: float = 0.5
    neg_thr: float | tuple[float, float] = 0.5
    low_quality: bool = False
    ignore_iof_thr: float = 0.5
    chunk_size: int = DEFAULT_CHUNK_SIZE

    def __call__(
        self,
        candidates: Sequence[Tensor],
        gt_boxes: Sequence[Tensor],
        gt_labels: Sequence[Tensor],
        *,
        ignore_boxes: Sequence[Tensor] | None = None,
        num_per_level: Sequence[int] | None = None,
    ) -> list[Assignment]:
        """Assign a batch; ``num_per_level`` is accepted for the interface and not used."""
        return assign_max_iou(
            candidates,
            gt_boxes,
            gt_labels,
            pos_thr=self.pos_thr,
            neg_thr=self.neg_thr,
            low_quality=self.low_quality,
            ignore_boxes=ignore_boxes,
            ignore_iof_thr=self.ignore_iof_thr,
            chunk_size=self.chunk_size,
        )
