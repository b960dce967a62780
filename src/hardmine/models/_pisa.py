"""PISA's training-pass terms in the RoI heads: ISR-P's classification weights and CARL's loss.

The sampler states them (``PISASampler.pisa_loss``, a ``hardmine.sample.PISALoss``); the ranking
and weighting are the core's pure functions (``hardmine.sample.pisa``); this module feeds them the
training pass's predictions. See ``hardmine.sample.pisa`` for the definitions and the paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder

from hardmine.boxes import iou_matrix
from hardmine.sample.pisa import PISALoss, carl_weights, isr_p_weights


def _positive_deltas(box_regression: Tensor, labels: Tensor, fg: Tensor) -> Tensor:
    """``[P, 4]``: the deltas of each positive's own class (``fg``: the positives' indices)."""
    return box_regression.reshape(labels.numel(), -1, 4)[fg, labels[fg]]


def isr_p_classification_weight(
    settings: PISALoss,
    *,
    rois: Tensor,
    box_regression: Tensor,
    labels: Tensor,
    matched: Tensor,
    image: Tensor,
    gt_index: Tensor,
    cls_loss: Tensor,
    weight: Tensor,
    box_coder: BoxCoder,
) -> Tensor:
    """The picks' classification-loss weights with ISR-P applied to the positives.

    Args:
        settings: ISR-P's ``k`` and ``bias``.
        rois: ``[R, 4]``: the picked RoIs, batch order.
        box_regression: ``[R, K * 4]``: the training pass's deltas.
        labels: ``int64 [R]``: the picks' classes, 0 for negatives.
        matched: ``[R, 4]``: each positive's ground-truth box.
        image: ``int64 [R]``: each pick's image.
        gt_index: ``int64 [R]``: each positive's ground truth in its image.
        cls_loss: ``[R]``: the unweighted classification losses.
        weight: ``[R]``: the picks' ``Selection`` weights.
        box_coder: the heads' box coder.

    Returns:
        ``[R]``, no gradient: ``weight`` with the positives' entries replaced by ISR-P's.
    """
    fg = torch.where(labels > 0)[0]
    if fg.numel() == 0:
        return weight
    with torch.no_grad():
        deltas = _positive_deltas(box_regression.detach(), labels, fg).float()
        predicted = box_coder.decode_single(deltas, rois[fg].float())
        # Aligned IoU: each positive's predicted box with its own ground truth.
        iou = iou_matrix(predicted[:, None], matched[fg, None].float())[:, 0, 0]
        new = isr_p_weights(
            iou,
            image[fg],
            gt_index[fg],
            labels[fg],
            cls_loss[fg],
            weight[fg],
            k=settings.isr_p_k,
            bias=settings.isr_p_bias,
        )
    return weight.detach().index_copy(0, fg, new.to(weight.dtype))


def carl_loss(
    settings: PISALoss,
    *,
    class_logits: Tensor,
    box_regression: Tensor,
    labels: Tensor,
    regression_targets: Tensor,
    beta: float,
) -> Tensor:
    """CARL: ``sum_i w_i * smooth_l1_i / R`` over the positives (``carl_weights``), ``R`` the
    picks, with the gradient of both the class probabilities and the box deltas.

    Args:
        settings: CARL's ``k`` and ``bias``.
        class_logits: ``[R, K]``.
        box_regression: ``[R, K * 4]``.
        labels: ``int64 [R]``, 0 for negatives.
        regression_targets: ``[R, 4]``, meaningful for the positives.
        beta: the smooth-L1's beta (the heads' ``box_loss_beta``).

    Returns:
        A scalar; ``0 * class_logits.sum()`` (still in the graph) without positives.
    """
    fg = torch.where(labels > 0)[0]
    if fg.numel() == 0:
        return class_logits.sum() * 0
    prob = (
        class_logits[fg].float().softmax(-1)[torch.arange(fg.numel(), device=fg.device), labels[fg]]
    )
    weight = carl_weights(prob, k=settings.carl_k, bias=settings.carl_bias)
    deltas = _positive_deltas(box_regression, labels, fg)
    reg = F.smooth_l1_loss(deltas, regression_targets[fg], beta=beta, reduction="none").sum(1)
    return (weight * reg).sum() / labels.numel()
