"""The training forward that RetinaNet and FCOS share, up to the labelling of their anchors."""

from __future__ import annotations

from collections import OrderedDict

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
    """
    if targets is None:
        raise ValueError("targets should not be None in training mode")
    image_list, targets = model.transform(images, targets)
    features = model.backbone(image_list.tensors)
    if isinstance(features, Tensor):
        features = OrderedDict([("0", features)])
    feature_list = list(features.values())
    head_outputs = model.head(feature_list)
    anchors = model.anchor_generator(image_list, feature_list)
    locations = [f.shape[-2] * f.shape[-1] for f in feature_list]
    return targets, head_outputs, anchors, locations
