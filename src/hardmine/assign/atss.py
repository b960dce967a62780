"""Adaptive Training Sample Selection (Zhang et al., "Bridging the Gap Between Anchor-based and
Anchor-free Detection via Adaptive Training Sample Selection", CVPR 2020).

Per ground truth, the ``topk`` anchors nearest its centre on every pyramid level are candidates;
the IoU threshold is the candidates' IoU mean plus standard deviation, so it adapts to each
object's scale and shape instead of being one fixed number. Picks equal MMDetection's
``ATSSAssigner`` (itself a transcription of the authors' code); where they differ, the docstring
of ``assign_atss`` says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from hardmine.assign._batch import DEFAULT_CHUNK_SIZE, prepare_batch
from hardmine.boxes import box_centers, box_iou
from hardmine.structures import IGNORE, NEGATIVE, POSITIVE, Assignment


def _nearest(distance: Tensor, num_per_level: Sequence[int], level_k: Sequence[int]) -> Tensor:
    """Per level, the ``k`` smallest distances of each row: ``[B, G, N]`` -> ``bool [B, G, N]``.

    Ties go to the lower anchor index, so the picks are deterministic (``topk`` leaves tie order
    unspecified, and anchors sharing a location always tie). The k-th smallest value comes from
    ``kthvalue``, which is unique; the ties at that value are ranked by a cumulative count, which
    costs no sort.
    """
    parts = []
    for d, k in zip(distance.split(list(num_per_level), dim=-1), level_k, strict=True):
        if k == d.shape[-1]:
            parts.append(torch.ones_like(d, dtype=torch.bool))
            continue
        kth = d.kthvalue(k, dim=-1, keepdim=True).values  # [B, G, 1]
        below, tie = d < kth, d == kth
        room = k - below.sum(dim=-1, keepdim=True)  # how many of the ties still fit
        parts.append(below | (tie & (tie.cumsum(dim=-1) <= room)))
    return torch.cat(parts, dim=-1)


def _adaptive_threshold(iou: Tensor, candidate: Tensor, num_candidates: int) -> Tensor:
    """Mean plus standard deviation (Bessel-corrected, as ``torch.std``) of the candidates' IoUs.

    ``iou: [B, G, N]``, ``candidate: bool [B, G, N]`` with ``num_candidates`` per row ->
    ``[B, G, 1]``. The statistics are taken about the best candidate IoU: equal IoUs then give
    exactly that IoU as threshold (a plain mean may round above it and reject them all), and the
    sums lose less precision. A single candidate has standard deviation 0.
    """
    ref = iou.masked_fill(~candidate, float("-inf")).amax(dim=-1, keepdim=True)  # [B, G, 1]
    dev = (iou - ref).masked_fill(~candidate, 0.0)  # [B, G, N]
    mean = dev.sum(dim=-1, keepdim=True) / num_candidates
    sq = (dev - mean).masked_fill(~candidate, 0.0).square()
    var = sq.sum(dim=-1, keepdim=True) / max(num_candidates - 1, 1)
    return ref + mean + var.sqrt()


def _center_inside(centers: Tensor, gt_boxes: Tensor, margin: float) -> Tensor:
    """Whether anchor centres lie inside ground truths by more than ``margin`` on every side.

    ``centers: [B, N, 2]``, ``gt_boxes: [B, G, 4]`` -> ``bool [B, G, N]``.
    """
    cx, cy = centers[:, None, :, 0], centers[:, None, :, 1]  # [B, 1, N]
    x1, y1, x2, y2 = (gt_boxes[..., i, None] for i in range(4))  # [B, G, 1]
    nearest_side = torch.minimum(torch.minimum(cx - x1, cy - y1), torch.minimum(x2 - cx, y2 - cy))
    return nearest_side > margin


def assign_atss(
    anchors: Sequence[Tensor],
    gt_boxes: Sequence[Tensor],
    gt_labels: Sequence[Tensor],
    *,
    num_per_level: Sequence[int],
    topk: int = 9,
    anchors_per_location: int = 1,
    scale_topk: bool = False,
    ignore_boxes: Sequence[Tensor] | None = None,
    ignore_iof_thr: float = 0.5,
    center_margin: float = 0.01,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> list[Assignment]:
    """Assign anchors by ATSS.

    For every ground truth: on each pyramid level, the ``topk`` anchors (fewer if the level has
    fewer) whose centres are nearest the ground truth's centre (L2) are candidates; the threshold
    is the mean plus the standard deviation of the candidates' IoUs; a candidate is positive where
    its IoU reaches the threshold and its centre lies inside the ground truth by more than
    ``center_margin`` on every side. An anchor positive for several ground truths takes the one
    with the highest IoU (the first on ties). Every other anchor is negative.

    Ignore regions follow MMDetection: anchors whose IoF with an ignore box (the fraction of the
    anchor covered) exceeds ``ignore_iof_thr`` are ignored, and are the last to be chosen as
    candidates (only when a level has too few others). One still chosen that passes the test
    stays positive, as in MMDetection.

    Differences from MMDetection, all in degenerate cases: ties in distance go to the lower anchor
    index (MMDetection's ``topk`` leaves them unspecified); equal candidate IoUs give exactly that
    IoU as threshold (MMDetection's float mean may round above it); a single candidate in all has
    standard deviation 0 (``torch.std`` gives NaN, hence no positive); ignore regions also apply
    in images without ground truth.

    Args:
        anchors: per image ``float [N, 4]``, levels concatenated in order; every image has the same
            ``N = sum(num_per_level)`` (the anchors themselves may differ).
        gt_boxes: per image ``float [G_i, 4]``.
        gt_labels: per image ``int [G_i]`` classes (1-based; 0 is background).
        num_per_level: anchors per pyramid level.
        topk: candidates per level and ground truth (the paper: 9, robust over 7-17).
        anchors_per_location: anchors sharing a location (scales times aspect ratios).
        scale_topk: take ``topk * anchors_per_location`` candidates per level, as the authors'
            code does; MMDetection does not (its ATSS has one anchor per location, where the two
            agree).
        ignore_boxes: per image ``float [K_i, 4]`` regions (e.g. COCO crowd boxes), or ``None``.
        ignore_iof_thr: IoF above which an anchor is ignored.
        center_margin: how far inside the ground truth a positive's centre must lie (MMDetection:
            0.01 pixels).
        chunk_size: ground truths per chunk of the ``[B, G, N]`` computation; smaller bounds memory
            with many ground truths, the result is the same.

    Returns:
        One ``Assignment`` per image (DESIGN.md conventions). ``gt_index`` and ``max_iou`` give the
        matched ground truth for positives and the best-overlapping one elsewhere.

    Raises:
        ValueError: on non-finite boxes, anchor counts that differ from ``sum(num_per_level)`` or
            invalid settings.
    """
    if topk < 1 or anchors_per_location < 1 or chunk_size < 1:
        raise ValueError(
            "topk, anchors_per_location and chunk_size must be positive, got "
            f"{topk}, {anchors_per_location}, {chunk_size}"
        )
    if any(n < 0 for n in num_per_level):
        raise ValueError(f"num_per_level must be non-negative, got {list(num_per_level)}")
    if len(anchors) == 0:
        return []
    batch = prepare_batch(anchors, gt_boxes, gt_labels, ignore_boxes, ignore_iof_thr)
    total = sum(num_per_level)
    if any(n != total for n in batch.num_candidates):
        raise ValueError(
            f"anchors: expected sum(num_per_level) = {total} per image, got {batch.num_candidates}"
        )
    anc, gts = batch.candidates, batch.gt_boxes  # [B, N, 4], [B, G, 4]
    k = topk * anchors_per_location if scale_topk else topk
    level_k = [min(k, n) for n in num_per_level]
    centers = box_centers(anc)  # [B, N, 2]

    best_iou = anc.new_full(anc.shape[:2], -1.0)  # [B, N]
    best_gt = torch.zeros(anc.shape[:2], dtype=torch.int64, device=anc.device)  # [B, N]
    pos_iou = anc.new_full(anc.shape[:2], float("-inf"))  # [B, N]
    pos_gt = torch.zeros_like(best_gt)  # [B, N]
    # Without anchors there is nothing to compute (and the reductions below need some).
    for start in range(0, gts.shape[1], chunk_size) if total else ():
        chunk = gts[:, start : start + chunk_size]  # [B, C, 4]
        valid = batch.gt_valid[:, start : start + chunk_size, None]  # [B, C, 1]
        iou = box_iou(chunk, anc)  # [B, C, N]

        value, index = iou.masked_fill(~valid, -1.0).max(dim=1)  # [B, N]
        better = value > best_iou  # strict: earlier chunks keep ties
        best_iou = torch.where(better, value, best_iou)
        best_gt = torch.where(better, index + start, best_gt)

        # Squared distances order anchors as the distances do, without a square root.
        distance = (centers[:, None] - box_centers(chunk)[:, :, None]).square().sum(dim=-1)
        distance = distance.masked_fill(batch.ignored[:, None], float("inf"))  # [B, C, N]
        candidate = _nearest(distance, num_per_level, level_k)
        positive = (
            candidate
            & (iou >= _adaptive_threshold(iou, candidate, sum(level_k)))
            & _center_inside(centers, chunk, center_margin)
            & valid
        )
        value, index = iou.masked_fill(~positive, float("-inf")).max(dim=1)  # [B, N]
        better = value > pos_iou
        pos_iou = torch.where(better, value, pos_iou)
        pos_gt = torch.where(better, index + start, pos_gt)

    is_pos = pos_iou > float("-inf")
    label = torch.where(is_pos, POSITIVE, torch.where(batch.ignored, IGNORE, NEGATIVE))
    gt_index = torch.where(is_pos, pos_gt, best_gt)
    max_iou = torch.where(is_pos, pos_iou, best_iou.clamp(min=0))
    return batch.split(label.to(torch.int8), gt_index, max_iou)


@dataclass(frozen=True)
class ATSSAssigner:
    """``assign_atss`` with its settings, in the ``Assigner`` interface; needs ``num_per_level``."""

    topk: int = 9
    anchors_per_location: int = 1
    scale_topk: bool = False
    ignore_iof_thr: float = 0.5
    center_margin: float = 0.01
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
        """Assign a batch of anchors.

        Raises:
            ValueError: without ``num_per_level``.
        """
        if num_per_level is None:
            raise ValueError("ATSSAssigner needs num_per_level, the anchors per pyramid level")
        return assign_atss(
            candidates,
            gt_boxes,
            gt_labels,
            num_per_level=num_per_level,
            topk=self.topk,
            anchors_per_location=self.anchors_per_location,
            scale_topk=self.scale_topk,
            ignore_boxes=ignore_boxes,
            ignore_iof_thr=self.ignore_iof_thr,
            center_margin=self.center_margin,
            chunk_size=self.chunk_size,
        )
