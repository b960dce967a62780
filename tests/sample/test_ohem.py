"""OHEM: exact NMS cases, a brute-force per-image reference, the MMDetection variant."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import nms

from hardmine.boxes import nms_first
from hardmine.sample import OHEMSampler, sample_ohem
from hardmine.structures import Assignment


def _assignment(label: list[int] | torch.Tensor) -> Assignment:
    label = torch.as_tensor(label, dtype=torch.int8)
    n = label.shape[0]
    return Assignment(label, torch.zeros(n, dtype=torch.long), torch.zeros(n), label.long())


def _ids(mask: torch.Tensor) -> list[int]:
    return torch.nonzero(mask).flatten().tolist()


BOXES = torch.tensor(
    [
        [0.0, 0.0, 10.0, 10.0],  # 0: loss 0.9
        [0.0, 0.0, 10.0, 11.0],  # 1: IoU 0.91 with 0, loss 0.8: suppressed
        [20.0, 20.0, 30.0, 30.0],  # 2: loss 0.5
        [0.0, 0.0, 10.0, 10.0],  # 3: ignored, loss 5: never picked, suppresses nothing
        [0.0, 0.0, 10.0, 14.0],  # 4: IoU 0.71 with 0: suppressed
        [0.0, 0.0, 10.0, 15.0],  # 5: IoU 0.67 with 0, 0.93 with 4 (suppressed): kept, loss 0.3
        [40.0, 40.0, 40.0, 50.0],  # 6: zero area, loss 0.2
    ]
)
LOSSES = torch.tensor([0.9, 0.8, 0.5, 5.0, 0.6, 0.3, 0.2])
LABELS = [1, 0, 0, -1, 0, 0, 0]


def test_nms_then_highest_losses():
    sel = sample_ohem([BOXES], [_assignment(LABELS)], [LOSSES], num=3)[0]
    assert _ids(sel.mask) == [0, 2, 5] and sel.weight.tolist() == sel.mask.float().tolist()
    sel = sample_ohem([BOXES], [_assignment(LABELS)], [LOSSES], num=10)[0]
    assert _ids(sel.mask) == [0, 2, 5, 6]


def test_without_nms_plain_top_losses():
    sel = sample_ohem([BOXES], [_assignment(LABELS)], [LOSSES], num=3, nms_iou=None)[0]
    assert _ids(sel.mask) == [0, 1, 4]


def test_pos_fraction_mines_groups_separately():
    # Positives {0, 1}, negatives the rest: at most 1 positive, then 2 negatives; NMS within each
    # group, so negative 4 is no longer suppressed by positive 0 but 5 is by 4.
    label = [1, 1, 0, -1, 0, 0, 0]
    sel = sample_ohem([BOXES], [_assignment(label)], [LOSSES], num=3, pos_fraction=0.5)[0]
    assert _ids(sel.mask) == [0, 2, 4]


def _reference(boxes, label, loss, num, nms_iou):
    """Per image: eligible candidates, greedy NMS by loss, the top ``num``."""
    eligible = torch.nonzero(label >= 0).flatten()
    keep = nms(boxes[eligible], loss[eligible], nms_iou)[:num]
    mask = torch.zeros(label.shape[0], dtype=torch.bool)
    mask[eligible[keep]] = True
    return mask


@pytest.mark.parametrize("n", [30, 1500])  # the large size takes torchvision's per-class path
def test_batched_equals_per_image_brute_force(n):
    gen = torch.Generator().manual_seed(n)
    boxes, labels, losses = [], [], []
    for k in range(4):
        xy = torch.rand(n, 2, generator=gen) * 100 - 50 * k  # out-of-image, negative coordinates
        boxes.append(torch.cat([xy, xy + 5 + torch.rand(n, 2, generator=gen) * 20], 1))
        labels.append(torch.randint(-1, 2, (n,), generator=gen))
        losses.append(torch.rand(n, generator=gen))
    assignments = [_assignment(lab) for lab in labels]
    batched = sample_ohem(boxes, assignments, losses, num=16)
    for sel, b, lab, loss in zip(batched, boxes, labels, losses, strict=True):
        assert torch.equal(sel.mask, _reference(b, lab, loss, 16, 0.7))
        single = sample_ohem([b], [_assignment(lab)], [loss], num=16)[0]
        assert torch.equal(sel.mask, single.mask)


def test_sampler_needs_losses_and_validates_them():
    sampler = OHEMSampler()
    assert sampler.needs_losses
    a = _assignment(LABELS)
    with pytest.raises(ValueError, match="losses"):
        sampler([BOXES], [a])
    with pytest.raises(ValueError, match="expected 7 candidates"):
        sampler([BOXES], [a], losses=[LOSSES[:5]])
    with pytest.raises(ValueError, match="NaN"):
        sampler([BOXES], [a], losses=[torch.full((7,), float("nan"))])


def _nms_reference(boxes, scores, segment, iou, k):
    """Per segment: torchvision's greedy NMS over all candidates, its first ``k`` survivors."""
    mask = torch.zeros(scores.shape[0], dtype=torch.bool)
    for s in segment.unique().tolist():
        if s < 0:
            continue
        members = torch.nonzero(segment == s).flatten()
        mask[members[nms(boxes[members], scores[members], iou)[:k]]] = True
    return mask


def _random_boxes(n, gen, spread=100.0, size=20.0):
    xy = torch.rand(n, 2, generator=gen) * spread - spread / 4
    return torch.cat([xy, xy + 1 + torch.rand(n, 2, generator=gen) * size], 1)


@pytest.mark.parametrize("k", [1, 5, 40, 1000])
@pytest.mark.parametrize("spread", [30.0, 200.0])  # crowded (few survivors) and sparse
def test_nms_first_equals_torchvision_nms(k, spread):
    gen = torch.Generator().manual_seed(k + int(spread))
    n = 600
    boxes = _random_boxes(n, gen, spread)
    scores = torch.rand(n, generator=gen)
    segment = torch.randint(-1, 5, (n,), generator=gen)
    expected = _nms_reference(boxes, scores, segment, 0.5, k)
    assert torch.equal(nms_first(boxes, scores, segment, 5, 0.5, k), expected)
    # Past the table budget it runs torchvision's batched_nms instead: the same picks.
    assert torch.equal(nms_first(boxes, scores, segment, 5, 0.5, k, max_cells=100), expected)


def test_nms_first_long_chain_and_growing_prefix():
    # Boxes sliding by 1 px: each overlaps its neighbours by IoU > 0.7, so greedy NMS keeps every
    # other box of a chain whose settling takes many rounds; duplicates of box 0 with higher
    # scores than everything else fill the first prefix with candidates that all get suppressed.
    x = torch.arange(60, dtype=torch.float32)
    chain = torch.stack([x, torch.zeros(60), x + 10, torch.full((60,), 10.0)], 1)
    dupes = torch.tensor([[0.0, 0.0, 10.0, 10.0]]).repeat(200, 1)
    boxes = torch.cat([chain, dupes])
    scores = torch.cat([1 - x / 100, torch.full((200,), 2.0)])
    segment = torch.zeros(260, dtype=torch.int64)
    expected = _nms_reference(boxes, scores, segment, 0.7, 10)
    got = nms_first(boxes, scores, segment, 1, 0.7, 10)
    assert torch.equal(got, expected) and int(got.sum()) == 10


def test_nms_first_equal_scores_prefer_the_lower_index():
    boxes = torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 10, 10], [0.0, 0, 10, 10], [50.0, 50, 60, 60]])
    scores = torch.tensor([1.0, 2.0, 2.0, 2.0])
    segment = torch.zeros(4, dtype=torch.int64)
    assert _ids(nms_first(boxes, scores, segment, 1, 0.7, 10)) == [1, 3]
    assert _ids(nms_first(boxes, scores, segment, 1, 0.7, 1)) == [1]


def test_nms_first_nothing_to_do():
    boxes, scores = torch.zeros(3, 4), torch.ones(3)
    assert not nms_first(boxes, scores, torch.full((3,), -1), 2, 0.7, 5).any()
    assert not nms_first(boxes, scores, torch.zeros(3, dtype=torch.int64), 1, 0.7, 0).any()
    empty = nms_first(
        torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 1, 0.7, 5
    )
    assert empty.shape == (0,)
    # Zero-area boxes overlap nothing: all survive.
    assert nms_first(boxes, scores, torch.zeros(3, dtype=torch.int64), 1, 0.7, 5).all()


def test_defaults_are_the_papers():
    """B = 128 RoIs over N = 2 images: 64 per image (Sec. 3.1, 4.2); NMS 0.7 (Sec. 4.1); no fg:bg
    ratio (Sec. 4.1: "does not need a fg-bg ratio")."""
    s = OHEMSampler()
    assert (s.num, s.nms_iou, s.pos_fraction) == (64, 0.7, None)


@pytest.mark.parametrize(
    ("setting", "value"), [("num", 0), ("nms_iou", 1.5), ("pos_fraction", -0.5)]
)
def test_bad_settings_name_the_setting(setting, value):
    with pytest.raises(ValueError, match=setting):
        OHEMSampler(**{setting: value})
    with pytest.raises(ValueError, match=setting):
        sample_ohem([BOXES], [_assignment(LABELS)], [LOSSES], **{setting: value})
