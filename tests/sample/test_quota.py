"""The sampling kernel: exact cases for take_top, draw, segments and shortfall filling."""

from __future__ import annotations

import pytest
import torch

from hardmine.sample.quota import (
    _draw_keyed,
    _draw_permuted,
    count_per_segment,
    draw,
    draw_uniform,
    fill_shortfall,
    flatten,
    segment_by_key,
    take_top,
    take_top_in_segments,
)
from hardmine.structures import Assignment

INF = float("inf")


def _ids(mask: torch.Tensor) -> list[int]:
    return torch.nonzero(mask).flatten().tolist()


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


def _sizes(*sizes: int):
    return _flat([[0] * n for n in sizes])


def test_take_top_ranks_within_images_and_groups():
    flat = _sizes(6)
    keys = torch.tensor([3.0, 1.0, 2.0, 5.0, 4.0, 0.0])
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    assert _ids(take_top(flat, keys, group, torch.tensor([[2, 1]]))) == [0, 2, 3]


def test_take_top_separates_images():
    flat = _sizes(3, 4)
    keys = torch.tensor([3.0, 1.0, 2.0, 9.0, 8.0, 0.5, 7.0])
    group = torch.tensor([0, 0, 0, 0, 1, 1, 0])
    quota = torch.tensor([[1, 0], [1, 2]])
    assert _ids(take_top(flat, keys, group, quota)) == [0, 3, 4, 5]


def test_take_top_ties_go_to_lower_index():
    flat = _sizes(5)
    group = torch.zeros(5, dtype=torch.long)
    assert _ids(take_top(flat, torch.ones(5), group, torch.tensor([[2]]))) == [0, 1]


def test_take_top_orders_negative_and_mixed_sign_keys():
    flat = _sizes(6)
    keys = torch.tensor([-1e9, -2.5, -0.0, 0.0, 1e-30, 7.0])
    group = torch.zeros(6, dtype=torch.long)
    for q, expected in [(1, [5]), (2, [4, 5]), (3, [3, 4, 5]), (5, [1, 2, 3, 4, 5])]:
        assert _ids(take_top(flat, keys, group, torch.tensor([[q]]))) == expected


def test_take_top_never_picks_minus_inf_or_negative_groups():
    flat = _sizes(5)
    keys = torch.tensor([-INF, 1.0, 2.0, -INF, 3.0])
    group = torch.tensor([0, 0, -1, 1, 1])
    assert _ids(take_top(flat, keys, group, torch.tensor([[10, 10]]))) == [1, 4]


def test_take_top_quota_larger_than_group_takes_all_and_zero_takes_none():
    flat = _sizes(4)
    keys = torch.tensor([0.5, 0.1, 0.9, 0.3])
    group = torch.tensor([0, 0, 1, 1])
    assert _ids(take_top(flat, keys, group, torch.tensor([[99, 0]]))) == [0, 1]


def test_take_top_max_quota_caps_and_empty_input():
    flat = _sizes(4)
    keys = torch.tensor([0.5, 0.1, 0.9, 0.3])
    group = torch.zeros(4, dtype=torch.long)
    assert _ids(take_top(flat, keys, group, torch.tensor([[3]]), max_quota=2)) == [0, 2]
    empty = _sizes(0, 0)
    out = take_top(empty, torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.ones(2, 1))
    assert out.shape == (0,)


def test_take_top_equals_a_per_segment_sort():
    gen = torch.Generator().manual_seed(3)
    sizes = [0, 7, 40, 1, 25]
    flat = _sizes(*sizes)
    n, groups = sum(sizes), 3
    for _ in range(20):
        keys = torch.randint(0, 6, (n,), generator=gen).float()  # many ties
        keys[torch.rand(n, generator=gen) < 0.1] = -INF
        group = torch.randint(-1, groups, (n,), generator=gen)
        quota = torch.randint(0, 12, (len(sizes), groups), generator=gen)
        expected = torch.zeros(n, dtype=torch.bool)
        for b in range(len(sizes)):
            for g in range(groups):
                members = [
                    i for i in range(n) if flat.image[i] == b and group[i] == g and keys[i] > -INF
                ]
                members.sort(key=lambda i: (-keys[i].item(), i))
                expected[members[: quota[b, g]]] = True
        assert torch.equal(take_top(flat, keys, group, quota), expected)


def test_take_top_in_segments_matches_old_cases():
    keys = torch.tensor([3.0, 1.0, 2.0, 5.0, 4.0, 0.0])
    segment = torch.tensor([0, 0, 0, 1, 1, 1])
    assert _ids(take_top_in_segments(keys, segment, torch.tensor([2, 1]))) == [0, 2, 3]
    keys = torch.tensor([-INF, 1.0, 1.0, -INF, 3.0, 1.0])
    segment = torch.tensor([0, 0, 0, 1, -1, 1])
    assert _ids(take_top_in_segments(keys, segment, torch.tensor([1, 5]))) == [1, 5]
    assert take_top_in_segments(torch.zeros(0), torch.zeros(0).long(), torch.ones(1)).shape == (0,)


def test_count_per_segment_skips_masked_and_negative():
    mask = torch.tensor([True, True, False, True, True])
    segment = torch.tensor([0, 2, 2, -1, 2])
    assert count_per_segment(mask, segment, 3).tolist() == [1, 0, 2]


def test_draw_respects_quota_and_never_draws_weight_zero():
    gen = torch.Generator().manual_seed(0)
    flat = _sizes(6)
    weight = torch.tensor([0.0, 1.0, 2.0, 0.0, 3.0, 1.0])
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    for _ in range(20):
        mask = draw(flat, weight, group, torch.tensor([[5, 1]]), generator=gen)
        assert _ids(mask[:3]) == [1, 2]
        assert not mask[3] and int(mask[3:].sum()) == 1


def test_draw_first_pick_is_proportional_to_weight():
    # 20000 independent segments of 4 candidates, one draw each, in a single call.
    gen = torch.Generator().manual_seed(1)
    reps, weights = 20000, torch.tensor([1.0, 2.0, 3.0, 4.0])
    flat = _sizes(*[4] * reps)
    group = torch.zeros(4 * reps, dtype=torch.long)
    quota = torch.ones(reps, 1, dtype=torch.long)
    mask = draw(flat, weights.repeat(reps), group, quota, generator=gen)
    freq = mask.view(reps, 4).float().mean(0)
    torch.testing.assert_close(freq, weights / weights.sum(), atol=0.015, rtol=0)


def test_segment_by_key_numbers_image_key_pairs():
    image = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    key = torch.tensor([5, 2, 5, 2, 0, 2, 7])
    mask = torch.tensor([True, True, True, True, False, True, True])
    assert segment_by_key(image, key, mask).tolist() == [1, 0, 1, 2, -1, 2, 3]


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


def test_count_per_image_equals_count_per_segment():
    gen = torch.Generator().manual_seed(2)
    for sizes in [[0, 5, 0, 17, 1], [0], [3], [0, 0, 4]]:
        flat = _sizes(*sizes)
        mask = torch.rand(sum(sizes), generator=gen) < 0.4
        expected = count_per_segment(mask, flat.image, len(sizes))
        assert torch.equal(flat.count(mask), expected)


def test_flat_batch_builds_its_fields_on_demand_equal_to_the_concatenation():
    assignments = [
        Assignment(
            label=torch.tensor([1, 0, -1], dtype=torch.int8),
            gt_index=torch.tensor([2, 0, 1]),
            max_iou=torch.tensor([0.7, 0.1, 0.45]),
            gt_class=torch.tensor([3, 0, 0]),
        ),
        Assignment.empty(0),
        Assignment.empty(2),
    ]
    flat = flatten(assignments)
    assert "gt_index" not in vars(flat)  # not built until read
    assert flat.gt_index.tolist() == [2, 0, 1, 0, 0]
    assert flat.max_iou.tolist() == pytest.approx([0.7, 0.1, 0.45, 0.0, 0.0])
    assert flat.gt_class.tolist() == [3, 0, 0, 0, 0]
    assert flat.image.tolist() == [0, 0, 0, 2, 2]
    assert flat.position.tolist() == [0, 1, 2, 0, 1]
    assert flat.starts.tolist() == [0, 3, 3]


@pytest.mark.parametrize("kernel", [_draw_permuted, _draw_keyed])
def test_draw_uniform_fills_groups_in_order_up_to_caps_and_total(kernel):
    # Per image: group 0 gets min(members, cap 0, total), group 1 min(members, cap 1, the rest).
    gen = torch.Generator().manual_seed(4)
    labels = [[], [1] * 5 + [0] * 9, [-1, -1], [1] * 2 + [0] * 3, [0] * 20, []]
    flat = _flat(labels)
    member = flat.label[None] == torch.tensor([[1], [0]], dtype=torch.int8)
    for caps, total, expected in [
        ([3, 8], 8, [(0, 0), (3, 5), (0, 0), (2, 3), (0, 8), (0, 0)]),
        ([9, 9], 4, [(0, 0), (4, 0), (0, 0), (2, 2), (0, 4), (0, 0)]),
        ([0, 1], 8, [(0, 0), (0, 1), (0, 0), (0, 1), (0, 1), (0, 0)]),
    ]:
        mask = kernel(flat, member, caps, total, gen)
        pos, neg = flat.count(mask & member[0]), flat.count(mask & member[1])
        got = list(zip(pos.tolist(), neg.tolist(), strict=True))
        assert got == expected
        assert not (mask & (flat.label == -1)).any()


def test_draw_uniform_on_an_empty_batch_and_a_cap_per_group():
    flat = _sizes(0, 0)
    member = torch.zeros(1, 0, dtype=torch.bool)
    assert draw_uniform(flat, member, caps=[3], total=3).shape == (0,)
    with pytest.raises(ValueError, match="one cap per group"):
        draw_uniform(_sizes(2), torch.ones(1, 2, dtype=torch.bool), caps=[1, 1], total=2)


def test_draw_uniform_single_group_is_uniform():
    # The label-blind case: one group, every member equally likely.
    gen = torch.Generator().manual_seed(5)
    flat = _flat([[0, 1, -1, 0, 1, 0]] * 3000)
    member = (flat.label >= 0)[None]
    mask = draw_uniform(flat, member, caps=[2], total=2, generator=gen)
    freq = mask.view(3000, 6).float().mean(0)
    expected = torch.tensor([0.4, 0.4, 0.0, 0.4, 0.4, 0.4])
    torch.testing.assert_close(freq, expected, atol=0.03, rtol=0)
