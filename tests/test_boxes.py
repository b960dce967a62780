"""The public box functions refuse non-finite input (defect D11): a NaN coordinate would give a
NaN IoU (or a silent 0 after a clamp) instead of an error."""

from __future__ import annotations

import math

import pytest
import torch

from hardmine.boxes import box_iof, box_iou, coordinate_limit, iof_matrix, iou_matrix
from hardmine.errors import NonFiniteError

GOOD = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 15.0]])


@pytest.mark.parametrize("function", [box_iou, box_iof])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("side", ["a", "b"])
def test_non_finite_boxes_are_a_value_error(function, bad: float, side: str) -> None:
    broken = GOOD.clone()
    broken[1, 2] = bad
    a, b = (broken, GOOD) if side == "a" else (GOOD, broken)
    with pytest.raises(NonFiniteError, match=rf"^{side}: contains NaN or infinite") as raised:
        function(a, b)
    assert isinstance(raised.value, ValueError)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_nan_in_half_precision_and_batched_boxes_too(dtype: torch.dtype) -> None:
    broken = GOOD.to(dtype).clone()[None].repeat(3, 1, 1)  # [B, N, 4]
    broken[2, 0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        box_iou(broken, GOOD.to(dtype)[None])


def test_a_last_dimension_other_than_4_is_refused() -> None:
    with pytest.raises(ValueError, match=r"b: expected boxes of shape \[\.\.\., 4\], got \[2, 3\]"):
        box_iof(GOOD, GOOD[:, :3])


def test_finite_input_gives_the_unchecked_matrices() -> None:
    assert torch.equal(box_iou(GOOD, GOOD), iou_matrix(GOOD, GOOD))
    assert torch.equal(box_iof(GOOD, GOOD), iof_matrix(GOOD, GOOD))
    # By hand: intersection 25, union 175; IoF of a 100 px box: 0.25.
    assert box_iou(GOOD, GOOD)[0, 1].item() == pytest.approx(25 / 175)
    assert box_iof(GOOD, GOOD)[0, 1].item() == pytest.approx(0.25)


def test_the_coordinate_limit_keeps_eight_squares_finite() -> None:
    # Widths, areas, unions and squared centre distances within ±L are at most 8 L².
    for dtype, limit in ((torch.float32, 2.0**62), (torch.float64, 2.0**510)):
        assert coordinate_limit(dtype) == limit
        assert math.isfinite(float(torch.tensor(8 * limit * limit, dtype=dtype)))
        assert not math.isfinite(float(torch.tensor(2 * 8 * limit * limit, dtype=dtype) * 4))
    assert coordinate_limit(torch.float16) == coordinate_limit(torch.bfloat16) == 2.0**62


@pytest.mark.parametrize("function", [box_iou, box_iof])
def test_boxes_whose_areas_overflow_are_refused(function) -> None:
    # Finite coordinates, infinite area: every IoU with [0, 0, 3e38, 3e38] would be 0, and a box
    # 6e38 wide and 0 high has a NaN area.
    for bad in ([0.0, 0.0, 3e38, 3e38], [-3e38, 5.0, 3e38, 5.0]):
        with pytest.raises(NonFiniteError, match=r"^b: coordinates up to 3e\+38, beyond"):
            function(GOOD, torch.tensor([bad]))
    at_limit = torch.tensor([[0.0, 0.0, 2.0**62, 2.0**62]])
    assert torch.isfinite(function(GOOD, at_limit)).all()


def test_integer_boxes_are_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"^a: expected a floating-point tensor, got torch.int64"):
        box_iou(GOOD.long(), GOOD)


def test_the_public_building_blocks_check_their_boxes() -> None:
    # Both gave silent wrong answers on NaN and on boxes whose areas overflow.
    from hardmine.sample.overlap import overlap_with_positives
    from hardmine.sample.pisa import nms_match
    from hardmine.sample.quota import flatten
    from hardmine.structures import Assignment

    for bad in (math.nan, 3e38):
        boxes = torch.tensor([[0.0, 0.0, bad, bad], [0.0, 0.0, 10.0, 9.0]])
        with pytest.raises(ValueError, match=r"^boxes: "):
            nms_match(boxes, torch.tensor([0.9, 0.8]), torch.zeros(2).long(), 1, 0.5)
        flat = flatten([Assignment.empty(2)])
        with pytest.raises(ValueError, match=r"^boxes: "):
            overlap_with_positives(boxes, flat, torch.tensor([True, False]))
    with pytest.raises(ValueError, match=r"^scores: contains NaN"):
        nms_match(GOOD, torch.tensor([math.nan, 0.5]), torch.zeros(2).long(), 1, 0.5)
