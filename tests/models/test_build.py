"""The named detector configurations."""

from __future__ import annotations

import inspect

import pytest
import torch
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet

from hardmine.assign.max_iou import MaxIoUAssigner
from hardmine.models import (
    DETECTORS,
    AssignedFCOS,
    AssignedRetinaNet,
    SamplingRoIHeads,
    build,
)
from hardmine.sample import OHEMSampler, RandomSampler

FAMILIES = {
    "faster_rcnn": FasterRCNN,
    "mask_rcnn": MaskRCNN,
    "retinanet": RetinaNet,
    "atss": AssignedRetinaNet,
    "fcos": FCOS,
    "atss_fcos": AssignedFCOS,
}


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_every_detector_builds_without_weights(name):
    model = build(name, 5)
    family = name.rsplit("_", 2 if name.endswith("r50_fpn") else 1)[0]
    assert isinstance(model, FAMILIES[family])


@pytest.mark.parametrize("name", [n for n in sorted(DETECTORS) if n.endswith("_tiny")])
def test_tiny_detectors_train(name, batch):
    torch.manual_seed(0)
    model = build(name, 3).train()
    losses = model(*batch)
    assert all(bool(torch.isfinite(v)) for v in losses.values())
    sum(losses.values()).backward()


def test_sampler_and_assigner_are_attached():
    model = build("faster_rcnn_tiny", 3, sampler=OHEMSampler(num=64))
    assert isinstance(model.roi_heads, SamplingRoIHeads)
    assert model.roi_heads.sampler == OHEMSampler(num=64)
    plain = build("faster_rcnn_tiny", 3)
    assert not isinstance(plain.roi_heads, SamplingRoIHeads)
    # An assigner alone keeps torchvision's sampling settings, through RandomSampler.
    assigner = MaxIoUAssigner(pos_thr=0.5, neg_thr=(0.1, 0.5))
    model = build("faster_rcnn_tiny", 3, assigner=assigner)
    assert model.roi_heads.sampler == RandomSampler(num=128, pos_fraction=0.25)
    assert model.roi_heads.assigner == assigner


def test_score_dtype_reaches_the_heads():
    model = build("faster_rcnn_tiny", 3, sampler=OHEMSampler(num=64), score_dtype="bfloat16")
    assert model.roi_heads.score_dtype is torch.bfloat16
    # Issue 14: bfloat16 where the hardware has it, by default ("auto"); None is the model's own.
    assert build("faster_rcnn_tiny", 3, sampler=OHEMSampler()).roi_heads.score_dtype == "auto"
    model = build("faster_rcnn_tiny", 3, sampler=OHEMSampler(), score_dtype=None)
    assert model.roi_heads.score_dtype is None
    with pytest.raises(ValueError, match="score_dtype must be"):
        build("faster_rcnn_tiny", 3, sampler=OHEMSampler(), score_dtype="float64")
    with pytest.raises(ValueError, match="no read-only pass"):
        build("atss_tiny", 3, score_dtype="bfloat16")


def test_build_errors():
    with pytest.raises(ValueError, match="unknown detector"):
        build("yolo", 3)
    with pytest.raises(ValueError, match="no pretrained weights"):
        build("faster_rcnn_tiny", 3, weights="DEFAULT")
    with pytest.raises(ValueError, match="takes no sampler"):
        build("atss_tiny", 3, sampler=RandomSampler())


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_every_builder_states_its_settings(name):
    """No ``**kwargs`` left in a builder's signature: torchvision's settings are listed, typed."""
    params = inspect.signature(DETECTORS[name]).parameters
    assert not any(p.kind is p.VAR_KEYWORD for p in params.values())
    assert {"weights", "min_size", "max_size", "size_divisible"} <= set(params)
    assert params["max_size"].annotation is int
    rcnn = "rcnn" in name
    assert ("box_detections_per_img" in params) == rcnn
    assert ("detections_per_img" in params) == (not rcnn)
    if name.endswith("r50_fpn"):
        assert params["weights_backbone"].default is None
    if name.startswith("atss") and "fcos" not in name:  # set by the builder itself
        assert "anchor_generator" not in params and "head" not in params


def test_build_refuses_settings_torchvision_would_swallow():
    # GeneralizedRCNNTransform takes **kwargs: a mistyped key was silently ignored.
    with pytest.raises(TypeError, match=r"faster_rcnn_tiny got unknown setting\(s\) bogus; valid:"):
        build("faster_rcnn_tiny", 3, bogus=1)
    with pytest.raises(TypeError, match=r"box_detections_per_imgs"):
        build("mask_rcnn_r50_fpn", 3, box_detections_per_imgs=10)
    with pytest.raises(TypeError, match=r"unknown setting\(s\) anchor_generator"):
        build("atss_tiny", 3, anchor_generator=None)
    model = build("fcos_tiny", 3, min_size=64, detections_per_img=7, size_divisible=64)
    assert model.detections_per_img == 7 and model.transform.size_divisible == 64
