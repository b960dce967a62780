"""The training forward that RetinaNet and FCOS share, up to the labelling of their anchors."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor
from torchvision.models.detection.fcos import FCOS
from torchvision.models.detection.retinanet import RetinaNet


def dense_forward(
    model: RetinaNet | FCOS,
    images: list[Tensor],
    targets: list[dict[str, Tensor]] | None,
) -> tuple[list[dict[str, Tensor]], dict[str, Tensor], list[Tensor], list[int]]:
    """Transform, backbone, head and anchors of a training step, as torchvision runs them.

    Args:
        model: the detector (training mode).
        images: per image, ``[3, H, W]`` in [0, 1].
        targets: per image, ``boxes [G_i, 4]``, ``labels int64 [G_i]`` (and extra box keys).

    Returns:
        The transformed targets, the head's outputs, the anchors per image ``[N, 4]``, and the
        number of feature-map locations per pyramid level (``H * W`` each).

    Raises:
        ValueError: ``targets`` is None.
        AssertionError: torchvision's own checks of the targets, with its messages: boxes not of
            shape ``[N, 4]``, or a box without positive width and height (``[60, 50, 40, 40]``,
            an ``xywh`` box given as ``xyxy``; ``[0, 0, 0, 0]``), which an assigner would
            otherwise quietly make background.
    """
    if targets is None:
        raise ValueError("targets should not be None in training mode")
    for target in targets:
        boxes = target["boxes"]
        torch._assert(isinstance(boxes, Tensor), "Expected target boxes to be of type Tensor.")
        torch._assert(
            len(boxes.shape) == 2 and boxes.shape[-1] == 4,
            "Expected target boxes to be a tensor of shape [N, 4].",
        )
    image_list, targets = model.transform(images, targets)
    check_degenerate_boxes(targets)
    features = model.backbone(image_list.tensors)
    if isinstance(features, Tensor):
        features = OrderedDict([("0", features)])
    feature_list = list(features.values())
    head_outputs = model.head(feature_list)
    anchors = model.anchor_generator(image_list, feature_list)
    locations = [f.shape[-2] * f.shape[-1] for f in feature_list]
    return targets, head_outputs, anchors, locations


def check_degenerate_boxes(targets: list[dict[str, Tensor]]) -> None:
    """torchvision's check of RetinaNet's and FCOS's (transformed) targets, with its message.

    Raises:
        AssertionError: a box whose ``x2 <= x1`` or ``y2 <= y1``.
    """
    for target_idx, target in enumerate(targets):
        boxes = target["boxes"]
        degenerate = boxes[:, 2:] <= boxes[:, :2]  # [G, 2]
        if degenerate.any():
            first: list[float] = boxes[torch.where(degenerate.any(dim=1))[0][0]].tolist()
            torch._assert(
                False,
                "All bounding boxes should have positive height and width."
                f" Found invalid box {first} for target at index {target_idx}.",
            )
