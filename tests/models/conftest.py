"""Tiny inputs shared by the model tests: two small images, one with ground truth, one without."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor


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
