"""Libra R-CNN sampling: per-bin quotas, shortfall, floor group, instance-balanced positives."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from hardmine.sample import sample_instance_balanced, sample_iou_balanced
from hardmine.sample.quota import flatten
from hardmine.structures import Assignment


def _assignment(label: list[int], max_iou: list[float], gt_index: list[int] | None = None):
    n = len(label)
    return Assignment(
        label=torch.tensor(label, dtype=torch.int8),
        gt_index=torch.tensor(gt_index or [0] * n),
        max_iou=torch.tensor(max_iou),
        gt_class=(torch.tensor(label) == 1).long(),
    )


def _negatives(per_bin: list[int], edges: list[float]) -> list[float]:
    """``per_bin[k]`` IoUs spread inside ``[edges[k], edges[k + 1])``."""
    ious: list[float] = []
    for k, count in enumerate(per_bin):
        ious += torch.linspace(edges[k], edges[k + 1], count + 1)[:-1].tolist()
    return ious


EDGES = [0.0, 0.5 / 3, 1.0 / 3, 0.5]


def _bin_counts(mask: torch.Tensor, ious: torch.Tensor) -> list[int]:
    return [int((mask & (ious >= lo) & (ious < hi)).sum()) for lo, hi in pairwise(EDGES)]


def test_full_bins_get_equal_quotas():
    # 1 positive, num 100: 99 negatives wanted, 33 per bin; the positive's IoU of 1 does not
    # stretch the bins (MMDetection's would span [0, 1) and leave two bins for 0.33-0.5 empty).
    ious = _negatives([200, 200, 200], EDGES)
    a = _assignment([1] + [0] * 600, [1.0, *ious])
    gen = torch.Generator().manual_seed(0)
    sel = sample_iou_balanced([a], num=100, generator=gen)[0]
    assert sel.mask[0]
    assert _bin_counts(sel.mask[1:], torch.tensor(ious)) == [33, 33, 33]


def test_remainder_and_short_bins_fill_uniformly_from_the_rest():
    ious = _negatives([300, 300, 5], EDGES)
    a = _assignment([0] * 605, ious)
    gen = torch.Generator().manual_seed(0)
    mask = sample_iou_balanced([a], num=90, generator=gen)[0].mask
    counts = _bin_counts(mask, torch.tensor(ious))
    assert counts[2] == 5 and min(counts[:2]) >= 30 and sum(counts) == 90


def test_negatives_at_or_above_neg_thr_count_in_the_top_bin():
    # An assigner with a higher negative threshold labels IoU 0.6 negative.
    ious = _negatives([50, 50, 0], EDGES) + [0.6] * 50
    gen = torch.Generator().manual_seed(0)
    mask = sample_iou_balanced([_assignment([0] * 150, ious)], num=30, generator=gen)[0].mask
    assert int(mask[100:].sum()) == 10


def test_floor_group_gets_its_fraction():
    # floor_thr 0.1: IoU < 0.1 is the floor; half the 40 negatives from it, 10 per bin above.
    floor = [0.05] * 100
    above = torch.linspace(0.1, 0.49, 100).tolist()
    a = _assignment([0] * 200, floor + above)
    gen = torch.Generator().manual_seed(0)
    mask = sample_iou_balanced(
        [a], num=40, num_bins=2, floor_thr=0.1, floor_fraction=0.5, generator=gen
    )[0].mask
    assert int(mask[:100].sum()) == 20
    above_t = torch.tensor(above)
    assert int((mask[100:] & (above_t < 0.3)).sum()) == 10


def test_floor_absorbs_the_balanced_shortfall():
    # Only 4 negatives above the floor: the floor group tops up to the negative quota.
    a = _assignment([0] * 104, [0.0] * 100 + [0.2, 0.3, 0.4, 0.45])
    gen = torch.Generator().manual_seed(0)
    mask = sample_iou_balanced([a], num=20, floor_thr=0.0, generator=gen)[0].mask
    assert mask[100:].all() and int(mask.sum()) == 20


def test_floor_fraction_without_floor_group_still_meets_the_quota():
    # floor_thr < 0: no floor group, so the quota set aside for it comes from any negative.
    ious = _negatives([200, 200, 200], EDGES)
    gen = torch.Generator().manual_seed(0)
    mask = sample_iou_balanced(
        [_assignment([0] * 600, ious)], num=90, floor_fraction=0.5, generator=gen
    )[0].mask
    counts = _bin_counts(mask, torch.tensor(ious))
    assert sum(counts) == 90 and min(counts) >= 15


def test_instance_balanced_positives_share_per_ground_truth():
    # 3 ground truths with 100, 10 and 5 positives, 30 wanted: 10 each (5 for the last), then 5
    # more from what is left, which only the first has.
    gt = [0] * 100 + [1] * 10 + [2] * 5
    flat = flatten([_assignment([1] * 115, [0.7] * 115, gt)])
    gen = torch.Generator().manual_seed(0)
    mask = sample_instance_balanced(flat, flat.label == 1, torch.tensor([30]), generator=gen)
    gt_t = torch.tensor(gt)
    assert [int((mask & (gt_t == g)).sum()) for g in range(3)] == [15, 10, 5]


def test_instance_balanced_is_per_image_in_a_batch():
    gen = torch.Generator().manual_seed(0)
    a = _assignment([1] * 40 + [0] * 200, [0.7] * 40 + [0.1] * 200, [0] * 30 + [3] * 10 + [0] * 200)
    b = _assignment([1] * 8 + [0] * 200, [0.7] * 8 + [0.1] * 200, [5] * 8 + [0] * 200)
    sel = sample_iou_balanced([a, b], num=80, pos_fraction=0.25, generator=gen)
    assert int(sel[0].mask[:30].sum()) == 10 and int(sel[0].mask[30:40].sum()) == 10
    assert int(sel[1].mask[:8].sum()) == 8 and sel[1].num_picked == 80


def test_uniform_positives_when_not_instance_balanced():
    gt = [0] * 100 + [1] * 4
    a = _assignment([1] * 104, [0.7] * 104, gt)
    counts = torch.zeros(2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        mask = sample_iou_balanced([a], num=40, instance_balanced=False, generator=gen)[0].mask
        counts += torch.tensor([mask[:100].sum(), mask[100:].sum()]).float()
    assert counts.sum() == 500  # int(40 * 0.25) = 10 per call
    assert counts[1] < 50  # ~4/104 of 500 ≈ 19, far below the balanced 4 per call = 200


@pytest.mark.parametrize(
    "kwargs", [{"num_bins": 0}, {"floor_fraction": 1.5}, {"floor_thr": 0.5, "neg_thr": 0.5}]
)
def test_bad_settings_raise(kwargs):
    with pytest.raises(ValueError):
        sample_iou_balanced([_assignment([0], [0.1])], **kwargs)
