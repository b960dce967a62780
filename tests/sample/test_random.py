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


def _labels_batch(gen: torch.Generator) -> list[list[int]]:
    """Images of every shape the sampler meets: empty, all ignored, no positives, few negatives."""
    batch = [[], [-1] * 7, [0] * 30, [1] * 40 + [0] * 3]
    for _ in range(4):
        n = int(torch.randint(0, 300, (1,), generator=gen))
        batch.append(torch.randint(-1, 2, (n,), generator=gen).tolist())
    order = torch.randperm(len(batch), generator=gen).tolist()
    return [batch[i] for i in order]


def test_picks_are_torchvision_s_under_the_same_seed():
    # On the CPU the draw is BalancedPositiveNegativeSampler's own: same RNG calls, same picks.
    from torchvision.models.detection._utils import BalancedPositiveNegativeSampler

    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        labels = _labels_batch(gen)
        num, fraction = [(512, 0.25), (16, 0.5), (5, 0.25), (1, 0.25)][trial % 4]
        torch.manual_seed(trial)
        ours = sample_random([_assignment(lab) for lab in labels], num=num, pos_fraction=fraction)
        torch.manual_seed(trial)
        # torchvision's matched labels: >= 1 positive, 0 negative, -1 ignored.
        pos, neg = BalancedPositiveNegativeSampler(num, fraction)(
            [torch.tensor(lab, dtype=torch.int64) for lab in labels]
        )
        for sel, p, n in zip(ours, pos, neg, strict=True):
            assert torch.equal(sel.mask, (p | n).bool())
            assert torch.equal(sel.weight, sel.mask.float())
    # A generator gives the same stream as the global RNG in the same state.
    labels = _labels_batch(gen)
    torch.manual_seed(7)
    global_rng = sample_random([_assignment(lab) for lab in labels])
    own = sample_random(
        [_assignment(lab) for lab in labels], generator=torch.Generator().manual_seed(7)
    )
    assert all(torch.equal(a.mask, b.mask) for a, b in zip(global_rng, own, strict=True))


def test_the_sync_free_draw_meets_the_quotas_uniformly():
    # The CUDA path (random keys), run on the CPU: exact quotas, uniform within each group.
    from hardmine.sample.quota import _draw_keyed, flatten

    gen = torch.Generator().manual_seed(1)
    labels = [1] * 6 + [0] * 10 + [-1] * 4
    assignments = [_assignment(labels)] * 3000 + [_assignment([]), _assignment([1, 1, 0])]
    flat = flatten(assignments)
    member = flat.label[None] == torch.tensor([[1], [0]], dtype=torch.int8)
    mask = _draw_keyed(flat, member, [4, 8], 8, gen)  # 4 of 6 positives, 4 of 10 negatives
    picks = torch.stack(mask[: 3000 * 20].split(20)).float()
    assert (picks[:, :6].sum(1) == 4).all() and (picks[:, 6:16].sum(1) == 4).all()
    assert not picks[:, 16:].any()
    assert mask[3000 * 20 :].tolist() == [True, True, True]
    freq = picks.mean(0)
    torch.testing.assert_close(freq[:6], torch.full((6,), 4 / 6), atol=0.03, rtol=0)
    torch.testing.assert_close(freq[6:16], torch.full((10,), 0.4), atol=0.03, rtol=0)
