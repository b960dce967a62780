"""Every sampler's and assigner's settings are checked where the component is made, and by the
same helper in its function: a value out of range is a ValueError naming the setting."""

from __future__ import annotations

import pytest
import torch

from hardmine.assign import (
    ASSIGNERS,
    ATSSAssigner,
    MaxIoUAssigner,
    assign_atss,
    assign_max_iou,
)
from hardmine.sample import (
    SAMPLERS,
    IoUBalancedSampler,
    MinedNegativeSampler,
    RandomSampler,
    sample_iou_balanced,
    sample_with_mined,
)
from hardmine.structures import Assignment

BAD = {
    "random": [("num", 0), ("pos_fraction", 1.01)],
    "ohem": [("num", -1), ("nms_iou", -0.1), ("pos_fraction", 2.0)],
    "iou_balanced": [
        ("num", 0),
        ("pos_fraction", -0.5),
        ("num_bins", 0),
        ("neg_thr", 0.0),
        ("floor_thr", 0.5),
        ("floor_fraction", 1.5),
    ],
    "overlap": [("num_bins", 0), ("upper", 1.5), ("epsilon", -1.0), ("bins", "mid")],
    "max_iou": [
        ("pos_thr", 1.5),
        ("neg_thr", 0.7),
        ("neg_thr", (0.4, 0.2)),
        ("ignore_iof_thr", -0.1),
        ("chunk_size", 0),
    ],
    "atss": [
        ("topk", 0),
        ("anchors_per_location", 0),
        ("ignore_iof_thr", 2.0),
        ("center_margin", -1.0),
        ("chunk_size", 0),
    ],
}
COMPONENTS = {**SAMPLERS, **ASSIGNERS}


def test_every_component_has_bad_values_listed() -> None:
    assert set(BAD) == set(COMPONENTS)


@pytest.mark.parametrize(
    ("name", "setting", "value"),
    [(name, setting, value) for name, cases in BAD.items() for setting, value in cases],
)
def test_bad_values_are_refused_when_made(name: str, setting: str, value: object) -> None:
    with pytest.raises(ValueError, match=setting):
        COMPONENTS[name](**{setting: value})


def test_defaults_are_valid() -> None:
    for cls in COMPONENTS.values():
        cls()


def _batch():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    label = torch.tensor([1, 0], dtype=torch.int8)
    return boxes, Assignment(label, torch.zeros(2, dtype=torch.long), torch.ones(2), label.long())


def test_the_functions_refuse_the_same_values() -> None:
    boxes, a = _batch()
    gt, labels = [boxes[:1]], [torch.tensor([1])]
    with pytest.raises(ValueError, match="floor_fraction"):
        sample_iou_balanced([a], floor_fraction=2.0)
    with pytest.raises(ValueError, match="ignore_iof_thr"):
        assign_max_iou([boxes], gt, labels, ignore_iof_thr=1.5)
    with pytest.raises(ValueError, match="center_margin"):
        assign_atss([boxes], gt, labels, num_per_level=[2], center_margin=-2.0)
    with pytest.raises(ValueError, match="share"):
        sample_with_mined(RandomSampler(), [boxes], [a], [torch.zeros(2, dtype=bool)], share=2)
    with pytest.raises(ValueError, match="share"):
        MinedNegativeSampler(RandomSampler(), share=-0.5)
    # The edges of the ranges are valid.
    IoUBalancedSampler(floor_fraction=1.0, pos_fraction=0.0)
    MaxIoUAssigner(pos_thr=0.5, neg_thr=(0.5, 0.5), ignore_iof_thr=1.0)
    ATSSAssigner(center_margin=0.0)
