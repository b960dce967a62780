"""Max-IoU assignment: the R-CNN family's rule (Girshick, "Fast R-CNN", ICCV 2015; Ren et al.,
"Faster R-CNN", NeurIPS 2015), with torchvision's ``Matcher`` semantics for low-quality matches.

Each candidate takes the ground truth it overlaps most; its IoU with it decides positive, negative
or ignore. The whole batch is one ``[B, G, N]`` computation (ground truths and candidates padded to
the batch maxima), cut into chunks over ``G`` so that memory stays bounded with many ground truths.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from hardmine.assign import _batch
from hardmine.assign._batch import DEFAULT_CHUNK_SIZE, Batch, best_of_chunk, prepare_batch
from hardmine.boxes import iou_matrix
from hardmine.structures import IGNORE, NEGATIVE, POSITIVE, Assignment, check_fields, settings


def check_max_iou_settings(
    *,
    pos_thr: float,
    neg_thr: float | tuple[float, float],
    low_quality: bool,
    ignore_iof_thr: float,
    chunk_size: int,
) -> tuple[float, float]:
    """Raise ``ValueError`` naming the first setting of ``assign_max_iou`` out of its range.

    Returns:
        The negative range ``(neg_lo, neg_hi)``.
    """
    if not 0.0 <= pos_thr <= 1.0:
        raise ValueError(f"pos_thr must be in [0, 1], got {pos_thr}")
    lo, hi = (0.0, neg_thr) if isinstance(neg_thr, (int, float)) else neg_thr
    if not 0.0 <= lo <= hi <= pos_thr:
        raise ValueError(
            f"neg_thr: need 0 <= neg_lo <= neg_hi <= pos_thr, got neg_thr={neg_thr}, "
            f"pos_thr={pos_thr}"
        )
    if not 0.0 <= ignore_iof_thr <= 1.0:
        raise ValueError(f"ignore_iof_thr must be in [0, 1], got {ignore_iof_thr}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return lo, hi


@dataclass(frozen=True)
class MaxIoUAssigner:
    """``assign_max_iou`` as an ``Assigner``; its fields are the settings (see there)."""

    pos_thr: float = 0.5
    neg_thr: float | tuple[float, float] = 0.5
    low_quality: bool = False
    ignore_iof_thr: float = 0.5
    chunk_size: int = DEFAULT_CHUNK_SIZE
    needs_levels: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_fields(self)
        check_max_iou_settings(**settings(self))

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
            candidates, gt_boxes, gt_labels, ignore_boxes=ignore_boxes, **settings(self)
        )


def assign_max_iou(
    candidates: Sequence[Tensor],
    gt_boxes: Sequence[Tensor],
    gt_labels: Sequence[Tensor],
    *,
    pos_thr: float = MaxIoUAssigner.pos_thr,
    neg_thr: float | tuple[float, float] = MaxIoUAssigner.neg_thr,
    low_quality: bool = MaxIoUAssigner.low_quality,
    ignore_boxes: Sequence[Tensor] | None = None,
    ignore_iof_thr: float = MaxIoUAssigner.ignore_iof_thr,
    chunk_size: int = MaxIoUAssigner.chunk_size,
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
        One ``Assignment`` per image (``hardmine.structures.Assignment``); ``max_iou`` has the
        candidates' dtype, ``float32`` for half-precision candidates.

    Raises:
        ValueError: on non-finite boxes or coordinates beyond ``hardmine.boxes.coordinate_limit``
            (±4.6e18 in float32: their areas would overflow), mismatched inputs or inconsistent
            thresholds.

    Example:
        IoUs 1, 0 and 0.45 with the one ground truth: positive, negative, and ignored between
        Fast R-CNN's thresholds (negatives in [0.1, 0.5) would take it; [0, 0.4) does not).

        >>> import torch
        >>> from hardmine.assign.max_iou import assign_max_iou
        >>> gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
        >>> boxes = [[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 22]]
        >>> boxes = torch.tensor(boxes, dtype=torch.float32)
        >>> (a,) = assign_max_iou([boxes], [gt], [torch.tensor([3])], neg_thr=(0.0, 0.4))
        >>> a.label.tolist(), a.gt_class.tolist(), [round(v, 2) for v in a.max_iou.tolist()]
        ([1, 0, -1], [3, 0, 0], [1.0, 0.0, 0.45])
    """
    neg_lo, neg_hi = check_max_iou_settings(
        pos_thr=pos_thr,
        neg_thr=neg_thr,
        low_quality=low_quality,
        ignore_iof_thr=ignore_iof_thr,
        chunk_size=chunk_size,
    )
    if len(candidates) == 0:
        return []
    batch = prepare_batch(candidates, gt_boxes, gt_labels, ignore_boxes, ignore_iof_thr)
    # A quarter of ATSS's blocks: measured fastest for the few passes per chunk here.
    max_elements = _batch.CPU_BLOCK_ELEMENTS // 4
    return [
        a
        for block, chunk in batch.blocks(chunk_size, max_elements)
        for a in _assign_block(block, pos_thr, neg_lo, neg_hi, low_quality, chunk)
    ]


def _label(best_iou: Tensor, pos_thr: float, neg_lo: float, neg_hi: float) -> Tensor:
    """``int8`` labels from the best IoUs: positive ``>= pos_thr``, negative in ``[neg_lo,
    neg_hi)``, ignored elsewhere. Bitwise arithmetic on the masks: a CPU runs it several times
    faster than a chain of ``masked_fill`` (whose branches on random masks mispredict)."""
    positive = best_iou >= pos_thr
    # A bool's bytes are 0 and 1: viewed as int8, no copy.
    if neg_lo <= 0.0 and neg_hi >= pos_thr:  # IoUs are >= 0: every other candidate is negative
        return positive.view(torch.int8)
    negative = best_iou < neg_hi
    if neg_lo > 0.0:
        negative &= best_iou >= neg_lo
    return positive.view(torch.int8) - (~(positive | negative)).view(torch.int8)


def _assign_block(
    batch: Batch, pos_thr: float, neg_lo: float, neg_hi: float, low_quality: bool, chunk_size: int
) -> list[Assignment]:
    """``assign_max_iou`` on one block of images (see ``Batch.blocks``)."""
    cand, gts = batch.candidates, batch.gt_boxes  # [B, N, 4], [B, G, 4]
    best_iou = best_gt = None
    low_quality_match = None  # [B, N] where low_quality
    if low_quality:
        low_quality_match = torch.zeros(cand.shape[:2], dtype=torch.bool, device=cand.device)
    for start in range(0, gts.shape[1], chunk_size):
        # Padded ground truths have IoU 0 with everything: they never win a max from the real ones
        # before them, and the low-quality rule leaves out ground truths whose best IoU is 0.
        iou = iou_matrix(gts[:, start : start + chunk_size], cand)  # [B, C, N]
        if low_quality and cand.shape[1]:
            if batch.ignored is not None:
                masked = iou.masked_fill(batch.ignored[:, None, :], -1.0)
            else:
                masked = iou
            gt_best = masked.amax(dim=2, keepdim=True)  # [B, C, 1]
            # NaN equals nothing: ground truths that overlap no candidate match none.
            gt_best = torch.where(gt_best > 0, gt_best, float("nan"))
            low_quality_match |= (masked == gt_best).any(dim=1)
        value, index = best_of_chunk(iou)  # [B, N]; overwrites iou
        if best_iou is None:
            best_iou, best_gt = value, index
        else:
            better = value > best_iou  # strict: the earlier chunk keeps ties, as one max would
            best_iou = torch.where(better, value, best_iou)
            best_gt = torch.where(better, index + start, best_gt)

    label = _label(best_iou, pos_thr, neg_lo, neg_hi)  # [B, N]
    if low_quality:
        label.masked_fill_(low_quality_match, POSITIVE)
    if not all(batch.num_gt):
        label.masked_fill_(~batch.has_gt, NEGATIVE)
    if batch.ignored is not None:
        label.masked_fill_(batch.ignored, IGNORE)
    return batch.split(label, best_gt, best_iou)
