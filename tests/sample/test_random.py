"""Random fg/bg sampling: positive fraction, padding with negatives, uniformity."""

from __future__ import annotations

import torch

from hardmine.sample import sample_random
from hardmine.structures import Assignment


def _assignment(label: list[int]) -> Assignment:
    n = len(label)
    return Assignment(
        label=torch.tensor(label, dtype=torch.int8),
        gt_index=torch.zeros(n, dtype=torch.long),
        max_iou=torch.zeros(n),
        gt_class=(torch.tensor(label) == 1).long(),
    )


def test_positive_fraction_is_met_when_enough_of_both():
    sel = sample_random([_assignment([1] * 100 + [0] * 1000)], num=512, pos_fraction=0.25)[0]
    assert int(sel.mask[:100].sum()) == 100  # 128 allowed, only 100 exist
    sel = sample_random([_assignment([1] * 300 + [0] * 1000)], num=512, pos_fraction=0.25)[0]
    assert int(sel.mask[:300].sum()) == 128 and int(sel.mask[300:].sum()) == 384


def test_negatives_pad_when_positives_are_short():
    sel = sample_random([_assignment([1] * 3 + [0] * 100 + [-1] * 10)], num=50)[0]
    assert sel.mask[:3].all() and int(sel.mask[3:103].sum()) == 47 and not sel.mask[103:].any()


def test_draw_is_uniform_over_candidates():
    # 2000 images of 10 negatives, 3 picked each: every position picked 30% of the time.
    gen = torch.Generator().manual_seed(0)
    sels = sample_random([_assignment([0] * 10)] * 2000, num=3, generator=gen)
    freq = torch.stack([s.mask for s in sels]).float().mean(0)
    torch.testing.assert_close(freq, torch.full((10,), 0.3), atol=0.04, rtol=0)
