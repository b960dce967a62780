"""Bad training targets are a ValueError naming the entry, the image and what is expected
(defect D16), not a NaN "candidate", an IndexError deep in a sampler or a silent wrong class."""

from __future__ import annotations

import math

import pytest
import torch

from hardmine.assign import assign_max_iou
from hardmine.models import build
from hardmine.sample import RandomSampler


def _targets() -> list[dict[str, torch.Tensor]]:
    boxes = torch.tensor([[4.0, 4.0, 30.0, 30.0], [20.0, 10.0, 60.0, 50.0]])
    return [
        {"boxes": boxes.clone(), "labels": torch.tensor([1, 2])},
        {"boxes": boxes.clone(), "labels": torch.tensor([3, 1])},
    ]


def _damaged(key: str, value: object, image: int = 1) -> list[dict[str, torch.Tensor]]:
    targets = _targets()
    targets[image][key] = value
    return targets


NAN_BOXES = torch.tensor([[4.0, 4.0, 30.0, 30.0], [20.0, math.nan, 60.0, 50.0]])
T1 = r'targets\[1\]\["{}"\]: '  # the entry of image 1
CASES = [
    (_damaged("boxes", NAN_BOXES), T1.format("boxes") + "contains NaN"),
    (_damaged("hard_negatives", torch.zeros(4)), T1.format("hard_negatives") + r"expected shape"),
    (
        _damaged("ignore_boxes", torch.zeros(1, 3)),
        T1.format("ignore_boxes") + r"expected shape \[M, 4\] \(xyxy\), got \[1, 3\]",
    ),
    (
        _damaged("ignore_boxes", torch.full((1, 4), math.inf)),
        T1.format("ignore_boxes") + "contains",
    ),
    (
        _damaged("labels", torch.tensor([0, 1])),
        T1.format("labels") + r"expected object classes in \[1, 3\] .*got 0",
    ),
    (_damaged("labels", torch.tensor([-1, 1])), T1.format("labels") + ".*got -1"),
    (_damaged("labels", torch.tensor([1, 4])), T1.format("labels") + r"expected .*\[1, 3\].*got 4"),
    (_damaged("labels", torch.tensor([1.0, 2.0])), T1.format("labels") + "expected an integer"),
    (_damaged("labels", torch.tensor([1])), T1.format("labels") + "1 labels for 2 boxes"),
    (_damaged("boxes", NAN_BOXES, image=0), r'targets\[0\]\["boxes"\]: contains NaN'),
    (_damaged("labels", None), T1.format("labels") + "missing"),
    # Finite, but their areas overflow float32: named as the ground truth, not as a candidate
    # after the transform's resize, and refused by the plain builds too (they trained on it).
    (
        _damaged("boxes", torch.tensor([[0.0, 0.0, 1e30, 1e30], [20.0, 10.0, 60.0, 50.0]])),
        T1.format("boxes") + r"coordinates up to 1e\+30, beyond ±2\*\*62",
    ),
    (
        _damaged("hard_negatives", torch.tensor([[-3e38, 5.0, 3e38, 5.0]])),
        T1.format("hard_negatives") + "coordinates up to 3e",
    ),
]


@pytest.mark.parametrize("name", ["faster_rcnn_tiny", "retinanet_tiny", "fcos_tiny"])
@pytest.mark.parametrize(("targets", "message"), CASES)
def test_bad_targets_are_named(name: str, targets: list, message: str) -> None:
    torch.manual_seed(0)
    kwargs = {"min_size": 64, "max_size": 64}
    if name == "faster_rcnn_tiny":
        model = build(name, 4, sampler=RandomSampler(num=16), **kwargs)
    else:
        from hardmine.assign import ATSSAssigner

        model = build(name, 4, assigner=ATSSAssigner(), **kwargs)
    model.train()
    with pytest.raises(ValueError, match=message):
        model([torch.rand(3, 64, 64), torch.rand(3, 64, 64)], targets)


@pytest.mark.parametrize("name", ["faster_rcnn_tiny", "retinanet_tiny", "fcos_tiny"])
@pytest.mark.parametrize(("targets", "message"), CASES)
def test_plain_builds_check_targets_too(name: str, targets: list, message: str) -> None:
    """S12: ``build`` without a sampler / assigner returned torchvision's model unchecked: a NaN
    box trained to a NaN loss, two labels for one box were accepted, a missing "labels" was a
    KeyError and a label >= num_classes a raw IndexError."""
    torch.manual_seed(0)
    model = build(name, 4, min_size=64, max_size=64).train()
    for target in targets:  # the plain models' targets: boxes and labels (and the extra keys)
        if target.get("labels", 0) is None:
            del target["labels"]
    with pytest.raises(ValueError, match=message):
        model([torch.rand(3, 64, 64), torch.rand(3, 64, 64)], targets)


@pytest.mark.parametrize("name", ["faster_rcnn_tiny", "retinanet_tiny", "fcos_tiny"])
def test_plain_builds_still_train(name: str) -> None:
    torch.manual_seed(0)
    model = build(name, 4, min_size=64, max_size=64).train()
    losses = model([torch.rand(3, 64, 64), torch.rand(3, 64, 64)], _targets())
    assert losses and all(torch.isfinite(v) for v in losses.values())


def test_generator_must_be_a_generator() -> None:
    """S12: ``generator=1`` was accepted and failed inside torch.randperm at the first step."""
    from hardmine.models import with_sampler

    model = build("faster_rcnn_tiny", 4)
    for make in (
        lambda: with_sampler(model, RandomSampler(), generator=1),
        lambda: build("faster_rcnn_tiny", 4, sampler=RandomSampler(), generator=1),
        lambda: build("fcos_tiny", 4, generator=1),
    ):
        with pytest.raises(TypeError, match=r"generator must be a torch\.Generator or None"):
            make()
    with_sampler(model, RandomSampler(), generator=torch.Generator().manual_seed(0))


def test_good_targets_still_train() -> None:
    torch.manual_seed(0)
    model = build("faster_rcnn_tiny", 4, sampler=RandomSampler(num=16), min_size=64, max_size=64)
    targets = _targets()
    targets[0]["ignore_boxes"] = torch.zeros(0, 4)
    targets[1]["hard_negatives"] = torch.tensor([[0.0, 0.0, 8.0, 8.0]])
    losses = model.train()([torch.rand(3, 64, 64), torch.rand(3, 64, 64)], targets)
    assert all(torch.isfinite(v) for v in losses.values())


def test_the_assigners_refuse_background_labels() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    with pytest.raises(ValueError, match=r"gt_labels\[1\]: expected object classes >= 1 .*got 0"):
        assign_max_iou([boxes, boxes], [boxes, boxes], [torch.tensor([2]), torch.tensor([0])])
    with pytest.raises(ValueError, match=r"gt_labels\[0\]: .*got -1"):
        assign_max_iou([boxes], [boxes], [torch.tensor([-1])])


def test_build_refuses_zero_classes() -> None:
    with pytest.raises(ValueError, match="num_classes must be an int of at least 2"):
        build("faster_rcnn_tiny", 0)
