"""The Overlap Sampler: IoU(p,n) / IoU(p,e), the four strategies, ε, batching, memory."""

from __future__ import annotations

import time

import pytest
import torch

from hardmine.boxes import box_iou
from hardmine.sample import overlap_with_positives, sample_overlap
from hardmine.sample.quota import flatten
from hardmine.structures import Assignment

POSITIVE_BOX = [0.0, 0.0, 100.0, 100.0]


def _shifted(ious: list[float]) -> list[list[float]]:
    """Boxes whose IoU with ``POSITIVE_BOX`` is each of ``ious``: shifted copies."""
    shifts = [100 * (1 - t) / (1 + t) for t in ious]
    return [[d, 0.0, 100.0 + d, 100.0] for d in shifts]


def _scene(neg_ious: list[float], num_pos: int = 1):
    """``num_pos`` copies of the positive box (ground truth 0), then negatives at ``neg_ious``."""
    boxes = torch.tensor([POSITIVE_BOX] * num_pos + _shifted(neg_ious))
    n = boxes.shape[0]
    label = torch.tensor([1] * num_pos + [0] * len(neg_ious), dtype=torch.int8)
    a = Assignment(
        label=label,
        gt_index=torch.zeros(n, dtype=torch.long),
        max_iou=torch.tensor([1.0] * num_pos + neg_ious),
        gt_class=label.long(),
    )
    return boxes, a


def _random_image(gen: torch.Generator, n: int, num_pos: int):
    xy = torch.rand(n, 2, generator=gen) * 200 - 20  # some leave the image
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=gen) * 60], 1)  # some zero-area
    boxes[:3, 2:] = boxes[:3, :2]
    label = torch.zeros(n, dtype=torch.int8)
    label[torch.randperm(n, generator=gen)[:num_pos]] = 1
    label[torch.randperm(n, generator=gen)[:3]] = -1
    return boxes, label


def test_overlaps_equal_a_per_image_brute_force():
    gen = torch.Generator().manual_seed(0)
    images = [_random_image(gen, n, p) for n, p in [(40, 7), (25, 0), (0, 0), (60, 12)]]
    flat = flatten([Assignment.empty(b.shape[0]) for b, _ in images])
    boxes = torch.cat([b for b, _ in images])
    positive = torch.cat([lab for _, lab in images]) == 1
    budget = 5 * flat.num_images * flat.max_size  # blocks of 5 positives: several chunks
    iou_pn, iou_pe = overlap_with_positives(boxes, flat, positive, budget=budget)
    want_pn, want_pe = [], []
    for b, lab in images:
        pos = lab == 1
        iou = box_iou(b, b[pos])  # [N, P]
        want_pn.append(iou.amax(1) if pos.any() else torch.zeros(b.shape[0]))
        others = box_iou(b, b).fill_diagonal_(0).amax(1) if b.shape[0] else torch.zeros(0)
        want_pe.append(torch.where(pos, others, 0))
    torch.testing.assert_close(iou_pn, torch.cat(want_pn))
    torch.testing.assert_close(iou_pe, torch.cat(want_pe))


def test_hard_takes_overlaps_above_theta_first():
    ious = [0.1] * 50 + [0.6] * 5 + [0.55] * 5
    boxes, a = _scene(ious)
    gen = torch.Generator().manual_seed(0)
    mask = sample_overlap([boxes], [a], num=21, strategy="hard", generator=gen)[0].mask
    assert mask[51:].all() and int(mask[1:51].sum()) == 10
    mask = sample_overlap([boxes], [a], num=9, strategy="hard", generator=gen)[0].mask
    assert int(mask[51:].sum()) == 8 and not mask[1:51].any()


def test_soft_fills_each_bin_with_its_quota():
    # K = 2 over [0, 0.7): bins [0, 0.35) and [0.35, 0.7); IoU >= 0.7 joins the top bin.
    ious = [0.05] * 100 + [0.4] * 60 + [0.8] * 40
    boxes, a = _scene(ious)
    gen = torch.Generator().manual_seed(0)
    mask = sample_overlap([boxes], [a], num=41, generator=gen)[0].mask  # 1 pos + 40 neg
    assert int(mask[1:101].sum()) == 20 and int(mask[101:].sum()) == 20
    # A short top bin leaves its shortfall to the uniform fill.
    boxes, a = _scene([0.05] * 100 + [0.8] * 6)
    mask = sample_overlap([boxes], [a], num=41, generator=gen)[0].mask
    assert mask[101:].all() and int(mask[1:101].sum()) == 34


def test_linear_pick_rate_rises_with_overlap():
    # 400 copies of one image in one batch: 10 zero-overlap negatives and 50 spread over
    # (0, 0.9]; 10 picked per image.
    ious = [0.0] * 10 + torch.linspace(0.018, 0.9, 50).tolist()
    boxes, a = _scene(ious)
    gen = torch.Generator().manual_seed(0)
    sels = sample_overlap([boxes] * 400, [a] * 400, num=11, strategy="linear", generator=gen)
    freq = torch.stack([s.mask for s in sels]).float().mean(0)[1:]  # [60]
    assert freq[:10].sum() == 0  # zero overlap is filler only, and no filler is needed
    by_quintile = freq[10:].view(5, 10).mean(1)
    assert (by_quintile.diff() > 0).all()


def test_epsilon_weights_each_ground_truths_best_matched_pick():
    boxes = torch.tensor([POSITIVE_BOX] * 5 + _shifted([0.1] * 20))
    label = torch.tensor([1] * 5 + [0] * 20, dtype=torch.int8)
    a = Assignment(
        label=label,
        gt_index=torch.tensor([0, 0, 1, 1, 1] + [0] * 20),
        max_iou=torch.tensor([0.6, 0.9, 0.8, 0.8, 0.7] + [0.1] * 20),
        gt_class=label.long(),
    )
    sel = sample_overlap([boxes], [a], num=25, pos_fraction=0.5)[0]
    assert sel.mask.all()
    assert sel.weight[:5].tolist() == [1.0, 2.0, 2.0, 1.0, 1.0]  # tie 2 vs 3: lower index
    assert (sel.weight[5:] == 1).all()
    sel = sample_overlap([boxes], [a], num=25, pos_fraction=0.5, epsilon=1.0)[0]
    assert (sel.weight == 1).all()


def test_positives_over_quota_follow_pos_strategy():
    # 20 positives: 5 isolated (IoU(p,e) 0) and 15 stacked copies (IoU(p,e) 1); quota 5.
    far = [[500.0 + 60 * i, 500.0, 550.0 + 60 * i, 550.0] for i in range(5)]
    boxes = torch.tensor(far + [POSITIVE_BOX] * 15 + _shifted([0.1] * 100))
    label = torch.tensor([1] * 20 + [0] * 100, dtype=torch.int8)
    a = Assignment(label, torch.zeros(120, dtype=torch.long), torch.full((120,), 0.6), label.long())
    gen = torch.Generator().manual_seed(0)
    mask = sample_overlap([boxes], [a], num=20, pos_strategy="hard", generator=gen)[0].mask
    assert int(mask[5:20].sum()) == 5 and not mask[:5].any()


def test_bad_strategy_raises():
    boxes, a = _scene([0.1])
    with pytest.raises(ValueError, match="strategy"):
        sample_overlap([boxes], [a], strategy="bogus")  # type: ignore[arg-type]


def test_large_batch_is_fast_and_bounded():
    # 16 images x 2000 proposals, 128 positives each: one [16, 2000, 128] IoU block.
    gen = torch.Generator().manual_seed(0)
    images = [_random_image(gen, 2000, 128) for _ in range(16)]
    boxes = [b for b, _ in images]
    assignments = [
        Assignment(
            lab, torch.zeros(2000, dtype=torch.long), torch.rand(2000, generator=gen), lab.long()
        )
        for _, lab in images
    ]
    start = time.perf_counter()
    sels = sample_overlap(boxes, assignments, generator=gen)
    assert time.perf_counter() - start < 5.0
    assert all(s.num_picked == 512 for s in sels)
