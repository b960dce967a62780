"""MinedNegativeSampler: the guaranteed share, exactly, around every sampler; and its hooks."""

from __future__ import annotations

import pytest
import torch

from hardmine.data import HardNegativeDataset, HardNegatives, MinedBoxes, SceneDataset
from hardmine.models._transform import append_hard_negatives
from hardmine.sample import SAMPLERS, MinedNegativeSampler, RandomSampler
from hardmine.structures import Assignment, RoIScores, Sampler

NUM = 64


def _image(gen, *, pos, neg, ign, mined_neg, mined_pos=0, mined_ign=0):
    """Candidates in the heads' order (others, then mined) with their assignment and mask."""
    labels = [1] * pos + [0] * neg + [-1] * ign + [0] * mined_neg + [1] * mined_pos
    labels += [-1] * mined_ign
    n = len(labels)
    label = torch.tensor(labels, dtype=torch.int8)
    mined = torch.zeros(n, dtype=torch.bool)
    mined[pos + neg + ign :] = True
    xy = torch.rand(n, 2, generator=gen) * 100
    boxes = torch.cat([xy, xy + 5 + torch.rand(n, 2, generator=gen) * 40], 1)
    max_iou = torch.where(label == 1, 0.7, torch.rand(n, generator=gen) * 0.5)
    gt_class = torch.where(label == 1, 1, 0).long()
    assignment = Assignment(label, torch.zeros(n, dtype=torch.int64), max_iou, gt_class)
    return boxes, assignment, mined


SPECS = [
    {"pos": 10, "neg": 200, "ign": 5, "mined_neg": 40},  # share 0.25 of 54 -> 13
    {"pos": 2, "neg": 100, "ign": 0, "mined_neg": 3},  # fewer mined than the share -> 3
    {"pos": 5, "neg": 80, "ign": 3, "mined_neg": 0},  # none mined
    {"pos": 4, "neg": 100, "ign": 0, "mined_neg": 20, "mined_pos": 2, "mined_ign": 4},
    {"pos": 0, "neg": 0, "ign": 0, "mined_neg": 0},  # no candidates
]


def _batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    images = [_image(gen, **spec) for spec in SPECS]
    boxes, assignments, mined = (list(x) for x in zip(*images, strict=True))
    losses = [torch.rand(b.shape[0], generator=gen) for b in boxes]
    return boxes, assignments, mined, losses


def _scores(boxes, seed=0) -> list[RoIScores]:
    """A read-only pass's outputs, for PISA (``needs_scores``): scores in [0, 0.1)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for b in boxes:
        loss = torch.rand(b.shape[0], generator=gen) + 0.1
        score = torch.rand(b.shape[0], generator=gen) * 0.1
        out.append(RoIScores(loss, loss, score, torch.ones_like(loss).long(), b))
    return out


def _base(name: str) -> Sampler:
    return SAMPLERS[name](num=NUM) if name == "ohem" else SAMPLERS[name](num=NUM, pos_fraction=0.25)


def test_exact_counts_with_random():
    boxes, assignments, mined, _ = _batch()
    sampler = MinedNegativeSampler(RandomSampler(num=NUM, pos_fraction=0.25), share=0.25)
    gen = torch.Generator().manual_seed(0)
    selections = sampler(boxes, assignments, mined=mined, generator=gen)
    counts = [
        (
            int((s.mask & a.positive).sum()),
            int((s.mask & a.negative).sum()),
            int((s.mask & m).sum()),
        )
        for s, a, m in zip(selections, assignments, mined, strict=True)
    ]
    # (positives, negatives, mined): 0.25 * 54 -> 13; 3 of 0.25 * 62; none; 0.25 * 48 -> 12
    # mined negatives (the 2 mined positives can be picked as positives on top).
    assert [c[:2] for c in counts] == [(10, 54), (2, 62), (5, 59), (6, 58), (0, 0)]
    mined_neg = [
        int((s.mask & m & a.negative).sum())
        for s, a, m in zip(selections, assignments, mined, strict=True)
    ]
    assert mined_neg == [13, 3, 0, 14, 0]


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("share", [0.0, 0.25, 1.0])
def test_invariants_around_every_sampler(name, share):
    boxes, assignments, mined, losses = _batch(1)
    sampler = MinedNegativeSampler(_base(name), share=share)
    assert isinstance(sampler, Sampler)
    assert sampler.needs_losses == (name == "ohem")
    assert sampler.needs_scores == (name == "pisa")
    assert (sampler.pisa_loss is not None) == (name == "pisa")
    gen = torch.Generator().manual_seed(3)
    extra = {"scores": _scores(boxes)} if sampler.needs_scores else {}
    selections = sampler(boxes, assignments, losses=losses, mined=mined, generator=gen, **extra)
    for s, a, m in zip(selections, assignments, mined, strict=True):
        assert not (s.mask & (a.label == -1)).any()  # ignore never picked, mined or not
        assert int(s.mask.sum()) <= NUM
        assert (s.weight[~s.mask] == 0).all() and (s.weight[s.mask] > 0).all()
        negatives = int((s.mask & a.negative).sum())
        available = int((m & a.negative).sum())
        assert int((s.mask & m & a.negative).sum()) == min(int(share * negatives), available)


def test_without_mined_it_is_the_base():
    boxes, assignments, _, _ = _batch()
    base = RandomSampler(num=NUM)
    wrapped = MinedNegativeSampler(base)
    got = wrapped(boxes, assignments, generator=torch.Generator().manual_seed(5))
    want = base(boxes, assignments, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(g.mask, w.mask) for g, w in zip(got, want, strict=True))


def test_deterministic_and_bad_settings():
    boxes, assignments, mined, _ = _batch()
    sampler = MinedNegativeSampler(RandomSampler(num=NUM))
    runs = [
        sampler(boxes, assignments, mined=mined, generator=torch.Generator().manual_seed(9))
        for _ in range(2)
    ]
    assert all(torch.equal(a.mask, b.mask) for a, b in zip(*runs, strict=True))
    with pytest.raises(ValueError, match="share"):
        MinedNegativeSampler(RandomSampler(), share=1.5)
    with pytest.raises(ValueError, match="mined"):
        sampler(boxes, assignments, mined=mined[:-1])


def test_append_hard_negatives():
    proposals = [torch.tensor([[0.0, 0.0, 4.0, 4.0]]), torch.zeros(0, 4)]
    targets = [{"hard_negatives": torch.tensor([[10.0, 20.0, 30.0, 40.0]])}, {}]
    candidates, mined = append_hard_negatives(proposals, targets)
    assert candidates[0].tolist() == [[0, 0, 4, 4], [10, 20, 30, 40]]
    assert candidates[1].shape == (0, 4)
    assert [m.tolist() for m in mined] == [[False, True], []]
    same, none = append_hard_negatives(proposals, [{}, {}])
    assert none is None and same[0] is proposals[0]


def test_hard_negative_dataset():
    scenes = SceneDataset(2, seed=0, image_size=64)
    mined = HardNegatives(
        images={
            2: MinedBoxes(
                torch.tensor([[16.0, 32.0, 32.0, 64.0]]),
                torch.ones(1),
                torch.ones(1, dtype=torch.int64),
            )
        }
    )
    dataset = HardNegativeDataset(scenes, mined)
    assert len(dataset) == 2
    assert dataset[0][1]["hard_negatives"].shape == (0, 4)
    _, target = dataset[1]
    assert target["hard_negatives"].tolist() == [[16.0, 32.0, 32.0, 64.0]]
    assert torch.equal(target["boxes"], scenes[1][1]["boxes"])
    with pytest.raises(ValueError, match="image ids this dataset lacks"):
        HardNegativeDataset(scenes, HardNegatives(images={5: MinedBoxes.empty()}, source="r0"))
