"""Drop-in for every torchvision detection builder: one training step with each sampler (R-CNNs)
or assigner (RetinaNet, FCOS) that applies, on small images, without pretrained weights.

Also a Faster R-CNN and a RetinaNet on a custom backbone whose feature maps have their own names.
The R-50 models are slow on a CPU: the images are 64 x 96 px (``min_size`` 64, ``max_size`` 96),
each model is built once per module and wrapped anew for each sampler (wrapping shares its
modules), and the step runs on one image.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from functools import cache

import pytest
import torch
from torch import Tensor, nn
from torchvision.models.detection import (
    FasterRCNN,
    RetinaNet,
    fasterrcnn_mobilenet_v3_large_320_fpn,
    fasterrcnn_mobilenet_v3_large_fpn,
    fasterrcnn_resnet50_fpn,
    fasterrcnn_resnet50_fpn_v2,
    fcos_resnet50_fpn,
    keypointrcnn_resnet50_fpn,
    maskrcnn_resnet50_fpn,
    maskrcnn_resnet50_fpn_v2,
    retinanet_resnet50_fpn,
    retinanet_resnet50_fpn_v2,
)
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign

from hardmine.assign import ASSIGNERS
from hardmine.models import with_assigner, with_sampler
from hardmine.sample import SAMPLERS

SMALL = {"min_size": 64, "max_size": 96}
NUM_CLASSES = 3


class NamedBackbone(nn.Module):
    """Two feature maps named ``feat_a`` (stride 4) and ``feat_b`` (stride 8), 32 channels."""

    out_channels = 32

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 32, 3, stride=4, padding=1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU())

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        a = self.a(x)
        return OrderedDict([("feat_a", a), ("feat_b", self.b(a))])


def _named_anchors(per_location: int) -> AnchorGenerator:
    sizes = ((16, 24, 32)[:per_location],) * 2 if per_location > 1 else ((16,), (32,))
    return AnchorGenerator(sizes, ((1.0,),) * 2)


def custom_faster_rcnn(**kwargs) -> FasterRCNN:
    return FasterRCNN(
        NamedBackbone(),
        rpn_anchor_generator=_named_anchors(1),
        box_roi_pool=MultiScaleRoIAlign(["feat_a", "feat_b"], 7, 2),
        **kwargs,
    )


def custom_retinanet(**kwargs) -> RetinaNet:
    return RetinaNet(NamedBackbone(), anchor_generator=_named_anchors(1), **kwargs)


# name -> builder; every one takes num_classes and the transform's sizes.
RCNNS: dict[str, Callable[..., nn.Module]] = {
    "fasterrcnn_resnet50_fpn": fasterrcnn_resnet50_fpn,
    "fasterrcnn_resnet50_fpn_v2": fasterrcnn_resnet50_fpn_v2,
    "fasterrcnn_mobilenet_v3_large_fpn": fasterrcnn_mobilenet_v3_large_fpn,
    "fasterrcnn_mobilenet_v3_large_320_fpn": fasterrcnn_mobilenet_v3_large_320_fpn,
    "maskrcnn_resnet50_fpn": maskrcnn_resnet50_fpn,
    "maskrcnn_resnet50_fpn_v2": maskrcnn_resnet50_fpn_v2,
    "keypointrcnn_resnet50_fpn": keypointrcnn_resnet50_fpn,
    "custom_faster_rcnn": custom_faster_rcnn,
}
DENSE: dict[str, Callable[..., nn.Module]] = {
    "retinanet_resnet50_fpn": retinanet_resnet50_fpn,
    "retinanet_resnet50_fpn_v2": retinanet_resnet50_fpn_v2,
    "fcos_resnet50_fpn": fcos_resnet50_fpn,
    "custom_retinanet": custom_retinanet,
}


@cache
def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    builder = RCNNS.get(name) or DENSE[name]
    if name.startswith("custom"):
        return builder(num_classes=NUM_CLASSES, **SMALL)
    return builder(weights=None, weights_backbone=None, num_classes=NUM_CLASSES, **SMALL)


def _batch() -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """One 64 x 96 image with two objects, their masks and 17 keypoints each."""
    g = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[8.0, 6.0, 40.0, 50.0], [50.0, 20.0, 90.0, 60.0]])
    masks = torch.zeros(2, 64, 96, dtype=torch.uint8)
    for m, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist(), strict=True):
        m[y0:y1, x0:x1] = 1
    xy = boxes[:, None, :2] + torch.rand(2, 17, 2, generator=g) * (
        boxes[:, None, 2:] - boxes[:, None, :2]
    )
    keypoints = torch.cat([xy, torch.ones(2, 17, 1)], dim=2)
    target = {
        "boxes": boxes,
        "labels": torch.tensor([1, 2]),
        "masks": masks,
        "keypoints": keypoints,
    }
    return [torch.rand(3, 64, 96, generator=g)], [target]


def _step(model: nn.Module) -> dict[str, Tensor]:
    model.train()
    model.zero_grad()
    losses = model(*_batch())
    assert losses and all(bool(torch.isfinite(v)) for v in losses.values()), losses
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    return losses


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("name", list(RCNNS))
def test_every_rcnn_trains_with_every_sampler(name: str, sampler: str) -> None:
    torch.manual_seed(1)
    model = with_sampler(_model(name), SAMPLERS[sampler](num=64))
    losses = _step(model)
    heads = {"maskrcnn": "loss_mask", "keypointrcnn": "loss_keypoint"}
    for prefix, key in heads.items():
        assert (key in losses) == name.startswith(prefix)


@pytest.mark.parametrize("assigner", sorted(ASSIGNERS))
@pytest.mark.parametrize("name", list(DENSE))
def test_every_dense_detector_trains_with_every_assigner(name: str, assigner: str) -> None:
    torch.manual_seed(1)
    model = with_assigner(_model(name), ASSIGNERS[assigner]())
    _step(model)
