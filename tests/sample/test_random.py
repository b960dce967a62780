"""Random fg/bg sampling: positive fraction, padding with negatives, uniformity."""

from __future__ import annotations

import pytest
import torch

from hardmine.sample import RandomSampler, sample_random
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


def test_without_a_ratio_the_draw_is_label_blind():
    """The OHEM paper's "removing this ratio (i.e. randomly sampling RoIs)" (Sec. 3.1): 100
    positives among 1000 candidates, 200 drawn: about 20 positives, not the ratio's 50."""
    a = _assignment([1] * 100 + [0] * 900 + [-1] * 50)
    gen = torch.Generator().manual_seed(0)
    sels = sample_random([a] * 500, num=200, pos_fraction=None, generator=gen)
    for s in sels:
        assert s.num_picked == 200 and not s.mask[1000:].any()
    positives = torch.stack([s.mask[:100] for s in sels]).float().sum(1)
    assert float(positives.mean()) == pytest.approx(20, abs=0.5)
    freq = torch.stack([s.mask[:1000] for s in sels]).float().mean(0)  # each about 0.2
    assert float((freq - 0.2).abs().max()) < 0.1
    # Fewer candidates than num: all of them, positives and negatives alike.
    (s,) = sample_random([_assignment([1] * 3 + [0] * 4 + [-1] * 2)], num=50, pos_fraction=None)
    assert s.mask.tolist() == [True] * 7 + [False] * 2


@pytest.mark.parametrize(("setting", "value"), [("num", 0), ("pos_fraction", -0.1)])
def test_bad_settings_name_the_setting(setting, value):
    with pytest.raises(ValueError, match=setting):
        RandomSampler(**{setting: value})
    with pytest.raises(ValueError, match=setting):
        sample_random([_assignment([0, 1])], **{setting: value})
