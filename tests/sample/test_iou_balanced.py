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


def _many_ground_truths(counts: list[int]) -> tuple[Assignment, torch.Tensor]:
    """Positives only: ``counts[g]`` candidates of ground truth ``g``."""
    gt_index = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    n = gt_index.numel()
    a = _assignment([1] * n, [0.7] * n, gt_index.tolist())
    return a, gt_index


def test_quota_below_the_ground_truths_spreads_one_pick_each_at_random():
    """40 ground truths, one with 200 candidates and 39 with 2; 32 picks. MMDetection's
    InstanceBalancedPosSampler covers 26 ground truths on average and a uniform draw 10, with 23
    picks from the large one. Here every pick is a different ground truth, each chosen with
    probability 32 / 40, the large one included."""
    a, gt_index = _many_ground_truths([200] + [2] * 39)
    flat = flatten([a])
    eligible = flat.label == 1
    large, covered, chosen = [], [], torch.zeros(40)
    for seed in range(400):
        gen = torch.Generator().manual_seed(seed)
        mask = sample_instance_balanced(flat, eligible, torch.tensor([32]), generator=gen)
        per_gt = torch.bincount(gt_index[mask], minlength=40)
        assert int(mask.sum()) == 32 and int(per_gt.max()) == 1
        large.append(int(per_gt[0]))
        covered.append(int((per_gt > 0).sum()))
        chosen += per_gt
    assert covered == [32] * 400
    assert sum(large) / 400 == pytest.approx(0.8, abs=0.06)  # 400 Bernoulli(0.8): std 0.02
    # Every ground truth, large or small, is chosen about 0.8 of the time.
    assert (chosen / 400 - 0.8).abs().max() < 0.1


def test_full_even_shares_and_the_unused_share_goes_round():
    gen = torch.Generator().manual_seed(0)
    a, gt_index = _many_ground_truths([100, 3, 3, 3, 3])
    flat = flatten([a])
    mask = sample_instance_balanced(flat, flat.label == 1, torch.tensor([20]), generator=gen)
    # Even share 4; the small ones have 3, so the large one takes 20 - 12 = 8.
    assert torch.bincount(gt_index[mask]).tolist() == [8, 3, 3, 3, 3]
    a, gt_index = _many_ground_truths([10, 10, 10])
    flat = flatten([a])
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        mask = sample_instance_balanced(flat, flat.label == 1, torch.tensor([20]), generator=gen)
        assert sorted(torch.bincount(gt_index[mask]).tolist()) == [6, 7, 7]


def test_instance_balancing_is_per_image_in_a_batch():
    a, gt_index = _many_ground_truths([50, 1, 1])
    b, _ = _many_ground_truths([5])
    flat = flatten([a, b, a])
    gen = torch.Generator().manual_seed(0)
    mask = sample_instance_balanced(flat, flat.label == 1, torch.tensor([3, 2, 60]), generator=gen)
    first, second, third = mask.split(flat.sizes)
    assert torch.bincount(gt_index[first]).tolist() == [1, 1, 1]
    assert int(second.sum()) == 2
    assert bool(third.all())  # more wanted than eligible: all
