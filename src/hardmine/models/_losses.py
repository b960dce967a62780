"""Per-candidate detection losses and their weighted reduction, shared by the RPN and RoI heads.

torchvision reduces its losses inside ``fastrcnn_loss`` / ``compute_loss``; a sampler needs them per
candidate (OHEM ranks by them) and the training pass needs them weighted (the overlap sampler's ε).
Weights reduce as ``sum(w * loss) / num_picked``: with all weights 1 that is exactly torchvision's
normalisation (mean classification loss; box loss summed over positives and divided by the number
of sampled candidates), so a sampler's weights rescale single terms without changing the scale of
the loss as a whole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.roi_heads import keypoints_to_heatmap, project_masks_on_boxes

from hardmine.structures import Assignment

# torchvision's Faster R-CNN uses smooth-L1 with beta 1/9 in both the RPN and the RoI heads
# (Detectron's value); Fast R-CNN's smooth-L1 (Girshick, ICCV 2015, Eq. 3), the loss of the OHEM
# paper's detector, has beta 1.
TORCHVISION_BOX_BETA = 1 / 9
FAST_RCNN_BOX_BETA = 1.0


def matched_boxes(candidates: Tensor, gt_boxes: Tensor, assignment: Assignment) -> Tensor:
    """The ground-truth box each positive candidate regresses to; the candidate itself elsewhere.

    Non-positive candidates get their own box so that their (unused) regression targets are 0
    rather than the ``-inf`` an empty image's dummy box would encode to.

    Args:
        candidates: ``[N, 4]``.
        gt_boxes: ``[G, 4]``, possibly ``G == 0``.
        assignment: the candidates' assignment.

    Returns:
        ``[N, 4]``.
    """
    if gt_boxes.shape[0] == 0:
        return candidates
    return torch.where(assignment.positive[:, None], gt_boxes[assignment.gt_index], candidates)


def fastrcnn_roi_losses(
    class_logits: Tensor,
    box_regression: Tensor,
    labels: Tensor,
    regression_targets: Tensor,
    *,
    beta: float = TORCHVISION_BOX_BETA,
) -> tuple[Tensor, Tensor]:
    """Fast R-CNN losses of every RoI, unreduced: the terms of torchvision's ``fastrcnn_loss``.

    Args:
        class_logits: ``[R, K]``.
        box_regression: ``[R, K * 4]``, class-specific deltas.
        labels: ``int64 [R]``, 0 for background.
        regression_targets: ``[R, 4]``, meaningful where ``labels > 0``.
        beta: the smooth-L1's beta (torchvision: 1/9; Fast R-CNN: 1).

    Returns:
        ``(classification [R], box [R])``: softmax log loss, and smooth-L1 summed over the four
        deltas of the labelled class, 0 for background RoIs.
    """
    num_rois = class_logits.shape[0]
    cls = F.cross_entropy(class_logits, labels, reduction="none")
    # The class count from the width, not -1: with no RoIs (every candidate ignored) -1 is
    # ambiguous and reshape raises.
    deltas = box_regression.reshape(num_rois, box_regression.shape[-1] // 4, 4)  # [R, K, 4]
    deltas = deltas[torch.arange(num_rois, device=labels.device), labels]  # [R, 4]
    foreground = labels > 0
    targets = torch.where(foreground[:, None], regression_targets, deltas.detach())
    box = F.smooth_l1_loss(deltas, targets, beta=beta, reduction="none").sum(1)
    return cls, torch.where(foreground, box, 0.0)


def rpn_anchor_losses(
    objectness: Tensor, deltas: Tensor, labels: Tensor, regression_targets: Tensor
) -> tuple[Tensor, Tensor]:
    """RPN losses of every anchor, unreduced: the terms of torchvision's RPN ``compute_loss``.

    Args:
        objectness: ``[A]`` logits.
        deltas: ``[A, 4]``.
        labels: ``float [A]``, 1 positive, 0 negative.
        regression_targets: ``[A, 4]``, meaningful where ``labels == 1``.

    Returns:
        ``(objectness [A], box [A])``: sigmoid log loss, and smooth-L1 (beta 1/9) summed over the
        four deltas, 0 for negatives.
    """
    obj = F.binary_cross_entropy_with_logits(objectness, labels, reduction="none")
    foreground = labels > 0
    targets = torch.where(foreground[:, None], regression_targets, deltas.detach())
    box = F.smooth_l1_loss(deltas, targets, beta=TORCHVISION_BOX_BETA, reduction="none").sum(1)
    return obj, torch.where(foreground, box, 0.0)


def weighted_mean(losses: Tensor, weight: Tensor, num_picked: int) -> Tensor:
    """``sum(weight * losses) / max(num_picked, 1)``: see the module docstring."""
    return (weight * losses).sum() / max(num_picked, 1)


def weighted_mask_loss(
    mask_logits: Tensor,
    proposals: list[Tensor],
    gt_masks: list[Tensor],
    labels: Tensor,
    gt_index: list[Tensor],
    weight: Tensor,
) -> Tensor:
    """torchvision's ``maskrcnn_loss`` with a weight per positive RoI.

    Each RoI's loss is its mean per-pixel binary log loss; the result is
    ``sum(weight * loss) / num_rois``, torchvision's pixel mean when the weights are 1.

    Args:
        mask_logits: ``[P, K, M, M]`` for the ``P`` positive RoIs of the batch.
        proposals: per image, the positive RoIs ``[P_i, 4]``.
        gt_masks: per image, ``[G_i, H, W]``.
        labels: ``int64 [P]``, the RoIs' classes.
        gt_index: per image, ``int64 [P_i]``, the matched ground truth.
        weight: ``float [P]``.

    Returns:
        A scalar; ``0 * mask_logits.sum()`` (still in the graph) when there are no positives.
    """
    if labels.numel() == 0:
        return mask_logits.sum() * 0
    size = mask_logits.shape[-1]
    targets = torch.cat(
        [
            project_masks_on_boxes(m, p, i, size)
            for m, p, i in zip(gt_masks, proposals, gt_index, strict=True)
        ]
    )  # [P, M, M]
    logits = mask_logits[torch.arange(labels.numel(), device=labels.device), labels]  # [P, M, M]
    per_roi = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean((1, 2))
    return weighted_mean(per_roi, weight, labels.numel())


def weighted_keypoint_loss(
    keypoint_logits: Tensor,
    proposals: list[Tensor],
    gt_keypoints: list[Tensor],
    gt_index: list[Tensor],
    weight: Tensor,
) -> Tensor:
    """torchvision's ``keypointrcnn_loss`` with a weight per positive RoI.

    Each visible keypoint that falls inside its RoI is a softmax log loss over the ``S x S``
    heatmap cells; the result is ``sum(weight of its RoI * loss) / number of such keypoints``,
    torchvision's mean when the weights are 1.

    Args:
        keypoint_logits: ``[P, K, S, S]`` for the ``P`` positive RoIs of the batch.
        proposals: per image, the positive RoIs ``[P_i, 4]``.
        gt_keypoints: per image, ``[G_i, K, 3]`` (x, y, visibility).
        gt_index: per image, ``int64 [P_i]``, the matched ground truth.
        weight: ``float [P]``.

    Returns:
        A scalar; ``0 * keypoint_logits.sum()`` (still in the graph) when no keypoint counts.
    """
    num_rois, num_keypoints, height, width = keypoint_logits.shape
    if height != width:
        raise ValueError(f"keypoint heatmaps must be square, got {height}x{width}")
    targets, valid = [], []
    for boxes, keypoints, index in zip(proposals, gt_keypoints, gt_index, strict=True):
        heatmap, visible = keypoints_to_heatmap(keypoints[index], boxes, height)  # [P_i, K] each
        targets.append(heatmap.reshape(-1))
        valid.append(visible.reshape(-1) > 0)
    counted = torch.where(torch.cat(valid))[0] if valid else torch.zeros(0, dtype=torch.int64)
    if counted.numel() == 0:
        return keypoint_logits.sum() * 0
    logits = keypoint_logits.reshape(num_rois * num_keypoints, height * width)
    per_keypoint = F.cross_entropy(logits[counted], torch.cat(targets)[counted], reduction="none")
    per_keypoint_weight = weight.repeat_interleave(num_keypoints)[counted]
    return weighted_mean(per_keypoint, per_keypoint_weight, counted.numel())
