"""Tiny inputs shared by the model tests: two small images, one with ground truth, one without."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor
from torchvision.models.detection import KeypointRCNN
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign

from hardmine.models.build import TinyBackbone, _tiny_rcnn_kwargs


def make_batch(seed: int = 0) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Two images (128x160, 128x128): three objects with masks in the first, none in the second."""
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, 128, 160, generator=g), torch.rand(3, 128, 128, generator=g)]
    boxes = torch.tensor([[10.0, 20.0, 60.0, 80.0], [70.0, 30.0, 120.0, 90.0], [30, 60, 150, 120]])
    masks = torch.zeros(3, 128, 160, dtype=torch.uint8)
    for m, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist(), strict=True):
        m[y0:y1, x0:x1] = 1
    targets = [
        {"boxes": boxes, "labels": torch.tensor([1, 2, 1]), "masks": masks},
        {
            "boxes": torch.zeros(0, 4),
            "labels": torch.zeros(0, dtype=torch.int64),
            "masks": torch.zeros(0, 128, 128, dtype=torch.uint8),
        },
    ]
    return images, targets


@pytest.fixture
def batch() -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    return make_batch()


NUM_KEYPOINTS = 4


def tiny_keypoint_rcnn(num_classes: int = 3) -> KeypointRCNN:
    """Keypoint R-CNN on the tiny backbone and settings, with ``NUM_KEYPOINTS`` keypoints."""
    levels = ["0", "1", "2"]
    return KeypointRCNN(
        TinyBackbone(),
        **_tiny_rcnn_kwargs(num_classes),
        keypoint_roi_pool=MultiScaleRoIAlign(levels, 14, 2),
        keypoint_head=KeypointRCNNHeads(64, [64, 64]),
        keypoint_predictor=KeypointRCNNPredictor(64, NUM_KEYPOINTS),
    )


@pytest.fixture
def keypoint_batch() -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """``make_batch`` with keypoints ``[G, NUM_KEYPOINTS, 3]``: in the box, one invisible each."""
    images, targets = make_batch()
    boxes = targets[0]["boxes"]
    g = torch.Generator().manual_seed(1)
    fraction = torch.rand(len(boxes), NUM_KEYPOINTS, 2, generator=g)
    xy = boxes[:, None, :2] + fraction * (boxes[:, None, 2:] - boxes[:, None, :2])
    visible = torch.ones(len(boxes), NUM_KEYPOINTS, 1)
    visible[:, -1] = 0
    targets[0]["keypoints"] = torch.cat([xy, visible], dim=2)
    targets[1]["keypoints"] = torch.zeros(0, NUM_KEYPOINTS, 3)
    return images, targets


@pytest.fixture
def keypoint_rcnn() -> Callable[..., KeypointRCNN]:
    """``tiny_keypoint_rcnn``, the builder."""
    return tiny_keypoint_rcnn
