"""The sampling kernel: exact cases for take_top, draw, segments and shortfall filling."""

from __future__ import annotations

import pytest
import torch

from hardmine.sample.quota import (
    count_per_segment,
    draw,
    fill_shortfall,
    flatten,
    segment_by_key,
    take_top,
)
from hardmine.structures import Assignment

INF = float("inf")


def _ids(mask: torch.Tensor) -> list[int]:
    return torch.nonzero(mask).flatten().tolist()


def test_take_top_ranks_within_segments():
    keys = torch.tensor([3.0, 1.0, 2.0, 5.0, 4.0, 0.0])
    segment = torch.tensor([0, 0, 0, 1, 1, 1])
    assert _ids(take_top(keys, segment, torch.tensor([2, 1]))) == [0, 2, 3]


def test_take_top_ties_go_to_lower_index():
    keys = torch.ones(5)
    assert _ids(take_top(keys, torch.zeros(5, dtype=torch.long), torch.tensor([2]))) == [0, 1]


def test_take_top_never_picks_minus_inf_or_negative_segments():
    keys = torch.tensor([-INF, 1.0, 2.0, -INF, 3.0])
    segment = torch.tensor([0, 0, -1, 1, 1])
    assert _ids(take_top(keys, segment, torch.tensor([10, 10]))) == [1, 4]


def test_take_top_quota_larger_than_segment_takes_all_and_zero_takes_none():
    keys = torch.tensor([0.5, 0.1, 0.9, 0.3])
    segment = torch.tensor([0, 0, 1, 1])
    assert _ids(take_top(keys, segment, torch.tensor([99, 0]))) == [0, 1]


def test_take_top_empty():
    empty = torch.zeros(0)
    assert take_top(empty, empty.long(), torch.tensor([3])).shape == (0,)


def test_count_per_segment_skips_masked_and_negative():
    mask = torch.tensor([True, True, False, True, True])
    segment = torch.tensor([0, 2, 2, -1, 2])
    assert count_per_segment(mask, segment, 3).tolist() == [1, 0, 2]


def test_draw_respects_quota_and_never_draws_weight_zero():
    gen = torch.Generator().manual_seed(0)
    weight = torch.tensor([0.0, 1.0, 2.0, 0.0, 3.0, 1.0])
    segment = torch.tensor([0, 0, 0, 1, 1, 1])
    for _ in range(20):
        mask = draw(weight, segment, torch.tensor([5, 1]), generator=gen)
        assert _ids(mask[:3]) == [1, 2]
        assert not mask[3] and int(mask[3:].sum()) == 1


def test_draw_first_pick_is_proportional_to_weight():
    # 20000 independent segments of 4 candidates, one draw each, in a single call.
    gen = torch.Generator().manual_seed(1)
    reps, weights = 20000, torch.tensor([1.0, 2.0, 3.0, 4.0])
    segment = torch.arange(reps).repeat_interleave(4)
    mask = draw(weights.repeat(reps), segment, torch.ones(reps, dtype=torch.long), generator=gen)
    freq = mask.view(reps, 4).float().mean(0)
    torch.testing.assert_close(freq, weights / weights.sum(), atol=0.015, rtol=0)


def test_segment_by_key_numbers_image_key_pairs():
    image = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    key = torch.tensor([5, 2, 5, 2, 0, 2, 7])
    mask = torch.tensor([True, True, True, True, False, True, True])
    assert segment_by_key(image, key, mask).tolist() == [1, 0, 1, 2, -1, 2, 3]


def _flat(labels: list[list[int]]):
    return flatten(
        [
            Assignment(
                label=torch.tensor(lab, dtype=torch.int8),
                gt_index=torch.zeros(len(lab), dtype=torch.long),
                max_iou=torch.zeros(len(lab)),
                gt_class=torch.zeros(len(lab), dtype=torch.long),
            )
            for lab in labels
        ]
    )


def test_fill_shortfall_tops_up_to_target_from_eligible_only():
    flat = _flat([[0, 0, 0, 0, 1], [0, 0, 0]])
    picked = torch.tensor([True, False, False, False, False, False, False, False])
    eligible = flat.label == 0
    gen = torch.Generator().manual_seed(0)
    out = fill_shortfall(flat, picked, eligible, torch.tensor([3, 5]), generator=gen)
    assert out[0] and not out[4]
    assert flat.count(out).tolist() == [3, 3]


def test_flatten_rejects_empty_batch_and_cat_checks_sizes():
    with pytest.raises(ValueError, match="empty batch"):
        flatten([])
    flat = _flat([[0, 0], [1]])
    assert flat.image.tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="expected 2 candidates"):
        flat.cat([torch.zeros(3, 4), torch.zeros(1, 4)], "boxes")
    with pytest.raises(ValueError, match="expected 2"):
        flat.cat([torch.zeros(2, 4)], "boxes")
