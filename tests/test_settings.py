"""Every sampler's and assigner's settings are checked where the component is made, and by the
same helper in its function: a value out of range is a ValueError naming the setting."""

from __future__ import annotations

import math

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
    "pisa": [
        ("num", 0),
        ("pos_fraction", 1.5),
        ("isr_n_k", -1.0),
        ("isr_n_bias", 1.5),
        ("score_thr", 1.0),
        ("iou_thr", -0.1),
        ("isr_p_k", float("nan")),
        ("isr_p_bias", -0.1),
        ("carl_k", -2.0),
        ("carl_bias", 2.0),
    ],
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


def _wrong_values() -> list[tuple[str, str, object, type[Exception]]]:
    """Defect D10: per field of every component, a value of another type (TypeError) and, for a
    float, infinity and NaN (ValueError), generated from the field's type hint."""
    import dataclasses
    import typing

    cases: list[tuple[str, str, object, type[Exception]]] = []
    for name, cls in COMPONENTS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            text = str(hints[f.name])
            if hints[f.name] is bool:
                cases += [(name, f.name, "yes", TypeError), (name, f.name, 1, TypeError)]
            elif hints[f.name] is int:
                cases += [(name, f.name, 2.5, TypeError), (name, f.name, True, TypeError)]
            elif "Literal" in text:
                cases += [(name, f.name, 3, TypeError), (name, f.name, "nope", ValueError)]
            elif "float" in text:
                cases += [(name, f.name, "0.5", TypeError)]
                cases += [(name, f.name, v, ValueError) for v in (math.inf, -math.inf, math.nan)]
    return cases


@pytest.mark.parametrize(("name", "setting", "value", "error"), _wrong_values())
def test_wrong_types_and_non_finite_values_are_refused(
    name: str, setting: str, value: object, error: type[Exception]
) -> None:
    with pytest.raises(error, match=setting):
        COMPONENTS[name](**{setting: value})


def test_the_type_check_covers_every_float_int_and_bool_setting() -> None:
    """The generated cases reach the settings that D10 named, so the check above cannot be empty."""
    cases = {(name, setting) for name, setting, _, _ in _wrong_values()}
    assert {("random", "num"), ("overlap", "epsilon"), ("overlap", "linear_top_up")} <= cases
    assert ("max_iou", "neg_thr") in cases and ("ohem", "nms_iou") in cases


def test_well_typed_values_still_pass() -> None:
    MaxIoUAssigner(neg_thr=(0.1, 0.5))
    MaxIoUAssigner(neg_thr=[0.1, 0.5])  # the run configuration's YAML list
    RandomSampler(num=16, pos_fraction=None)
    IoUBalancedSampler(pos_fraction=1)  # an int where a float is meant
    with pytest.raises(ValueError, match="neg_thr"):
        MaxIoUAssigner(neg_thr=(0.1, math.nan))
