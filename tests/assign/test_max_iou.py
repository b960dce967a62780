"""Max-IoU assignment: exact small cases, edge cases, and equality with torchvision's Matcher."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torchvision.models.detection._utils import Matcher

from hardmine.assign import MaxIoUAssigner, _batch, assign_max_iou
from hardmine.boxes import box_iou
from hardmine.structures import Assigner, Assignment

GT = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
# IoUs with GT: 1, 0.5, 0.4, 0.05, 0.
CANDIDATES = torch.tensor(
    [
        [0.0, 0.0, 10.0, 10.0],
        [0.0, 0.0, 10.0, 5.0],
        [0.0, 0.0, 10.0, 4.0],
        [0.0, 0.0, 10.0, 0.5],
        [20.0, 20.0, 30.0, 30.0],
    ]
)


def labels(*counts: int) -> list[Tensor]:
    return [torch.arange(1, n + 1) for n in counts]


def random_boxes(n: int, generator: torch.Generator, size: float = 60.0) -> Tensor:
    xy = torch.rand(n, 2, generator=generator) * size
    wh = torch.rand(n, 2, generator=generator) * size / 2 + 1
    return torch.cat([xy, xy + wh], dim=1)


def assert_same(a: Assignment, b: Assignment) -> None:
    for field in ("label", "gt_index", "max_iou", "gt_class"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.dtype == y.dtype, field
        assert torch.equal(x, y), field


def test_thresholds_exact() -> None:
    (a,) = assign_max_iou([CANDIDATES], [GT], [torch.tensor([7])], pos_thr=0.5, neg_thr=0.5)
    assert a.label.tolist() == [1, 1, 0, 0, 0]
    assert a.gt_class.tolist() == [7, 7, 0, 0, 0]
    assert torch.allclose(a.max_iou, torch.tensor([1.0, 0.5, 0.4, 0.05, 0.0]))


def test_background_lower_bound() -> None:
    (a,) = assign_max_iou([CANDIDATES], [GT], labels(1), pos_thr=0.5, neg_thr=(0.1, 0.5))
    assert a.label.tolist() == [1, 1, 0, -1, -1]
    (a,) = assign_max_iou([CANDIDATES], [GT], labels(1), pos_thr=0.7, neg_thr=0.3)
    assert a.label.tolist() == [1, -1, -1, 0, 0]


def test_conventions() -> None:
    g = torch.Generator().manual_seed(0)
    cand, gts = random_boxes(50, g), random_boxes(4, g)
    gt_labels = torch.tensor([3, 1, 4, 2])
    (a,) = assign_max_iou([cand], [gts], [gt_labels], neg_thr=(0.1, 0.5))
    assert a.label.dtype == torch.int8 and a.gt_index.dtype == torch.int64
    assert a.gt_class.dtype == torch.int64 and a.max_iou.dtype == torch.float32
    assert set(a.label.tolist()) <= {-1, 0, 1}
    iou = box_iou(gts, cand)
    assert torch.equal(a.gt_index, iou.argmax(dim=0))
    assert torch.equal(a.max_iou, iou.amax(dim=0))
    assert torch.equal(a.gt_class, torch.where(a.positive, gt_labels[a.gt_index], 0))
    (a64,) = assign_max_iou([cand.double()], [gts.double()], [gt_labels])
    assert a64.max_iou.dtype == torch.float64


@pytest.mark.parametrize("low_quality", [False, True])
@pytest.mark.parametrize(("high", "low"), [(0.5, 0.5), (0.7, 0.3), (0.5, 0.0)])
def test_matches_torchvision(low_quality: bool, high: float, low: float) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(8):
        cand, gts = random_boxes(200, g), random_boxes(6, g)
        # Duplicates make ties: between candidates (low-quality rule) and between ground truths.
        cand[100:110] = cand[:10]
        gts[5] = gts[0]
        iou = box_iou(gts, cand)
        assert (iou.amax(dim=1) > 0).all()  # torchvision differs only for GTs that touch nothing
        matches = Matcher(high, low, allow_low_quality_matches=low_quality)(iou)
        (a,) = assign_max_iou(
            [cand], [gts], labels(6), pos_thr=high, neg_thr=low, low_quality=low_quality
        )
        expected = torch.where(matches >= 0, 1, torch.where(matches == -1, 0, -1))
        assert torch.equal(a.label.long(), expected)
        assert torch.equal(a.gt_index[matches >= 0], matches[matches >= 0])


def test_low_quality_exact() -> None:
    gts = torch.tensor(
        [[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 110.0, 110.0], [50.0, 50.0, 54.0, 54.0]]
    )
    cand = torch.tensor(
        [
            [0.0, 0.0, 10.0, 3.0],  # IoU 0.3 with GT 0, its best: low-quality positive
            [0.0, 0.0, 10.0, 3.0],  # a tie: also positive
            [0.0, 0.0, 10.0, 2.0],
            [50.0, 50.0, 54.0, 54.0],  # GT 2 itself: positive by threshold
        ]
    )
    # GT 1 overlaps nothing: it must not turn the IoU-0 candidates positive.
    (a,) = assign_max_iou([cand], [gts], labels(3), pos_thr=0.7, neg_thr=0.3, low_quality=True)
    assert a.label.tolist() == [1, 1, 0, 1]
    assert a.gt_index.tolist() == [0, 0, 0, 2]
    (a,) = assign_max_iou([cand], [gts], labels(3), pos_thr=0.7, neg_thr=0.3)
    assert a.label.tolist() == [-1, -1, 0, 1]


def test_low_quality_goes_to_the_candidates_best_gt() -> None:
    # Candidate 1 is GT 1's best match (IoU 0.53) but overlaps GT 0 more (0.9): as torchvision
    # (and unlike MMDetection), it is matched to GT 0.
    gts = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, -8.0, 10.0, 9.0]])
    cand = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 9.0]])
    iou = box_iou(gts, cand)
    assert iou[1].argmax() == 1 and iou[:, 1].argmax() == 0
    (a,) = assign_max_iou([cand], [gts], labels(2), pos_thr=0.95, neg_thr=0.3, low_quality=True)
    expected = Matcher(0.95, 0.3, allow_low_quality_matches=True)(iou)
    assert a.label.tolist() == [1, 1]
    assert a.gt_index.tolist() == expected.tolist() == [0, 0]


def test_no_ground_truth() -> None:
    empty = torch.zeros(0, 4)
    (a,) = assign_max_iou([CANDIDATES], [empty], labels(0), neg_thr=(0.1, 0.5), low_quality=True)
    assert a.label.tolist() == [0] * 5
    assert a.gt_index.tolist() == [0] * 5 and a.gt_class.tolist() == [0] * 5
    assert a.max_iou.tolist() == [0.0] * 5
    ignore = [torch.tensor([[19.0, 19.0, 31.0, 31.0]])]
    (a,) = assign_max_iou([CANDIDATES], [empty], labels(0), ignore_boxes=ignore)
    assert a.label.tolist() == [0, 0, 0, 0, -1]


def test_no_candidates() -> None:
    out = assign_max_iou([torch.zeros(0, 4), torch.zeros(0, 4)], [GT, GT], labels(1, 1))
    for a in out:
        assert a.num_candidates == 0 and a.label.dtype == torch.int8
    (a,) = assign_max_iou([torch.zeros(0, 4)], [torch.zeros(0, 4)], labels(0), low_quality=True)
    assert a.num_candidates == 0
    assert assign_max_iou([], [], []) == []


def test_all_equal_ious() -> None:
    cand = GT.repeat(6, 1) + torch.tensor([0.0, 0.0, 0.0, 10.0])  # all IoU 0.5
    (a,) = assign_max_iou([cand], [GT], labels(1), pos_thr=0.7, neg_thr=0.3, low_quality=True)
    assert a.label.tolist() == [1] * 6  # every tied best match
    (a,) = assign_max_iou([cand], [GT.repeat(3, 1)], labels(3), pos_thr=0.5)
    assert a.label.tolist() == [1] * 6 and a.gt_index.tolist() == [0] * 6  # first GT on ties


def test_degenerate_boxes() -> None:
    cand = torch.tensor(
        [
            [5.0, 5.0, 5.0, 5.0],  # zero area inside the GT
            [-50.0, -50.0, -40.0, -40.0],  # off the image
            [0.0, 0.0, 10.0, 10.0],
        ]
    )
    gts = torch.tensor([[0.0, 0.0, 10.0, 10.0], [3.0, 3.0, 3.0, 8.0]])  # the second has no area
    (a,) = assign_max_iou([cand], [gts], labels(2), low_quality=True)
    assert a.label.tolist() == [0, 0, 1]
    assert a.max_iou.tolist() == [0.0, 0.0, 1.0]


def test_ignore_regions() -> None:
    ignore = [torch.tensor([[0.0, 0.0, 10.0, 5.0]])]  # covers half of candidate 0, all of 1-3
    (a,) = assign_max_iou([CANDIDATES], [GT], labels(1), ignore_boxes=ignore)
    assert a.label.tolist() == [1, -1, -1, -1, 0]  # candidate 1 would be positive: ignore wins
    (a,) = assign_max_iou([CANDIDATES], [GT], labels(1), ignore_boxes=ignore, ignore_iof_thr=0.4)
    assert a.label.tolist() == [-1, -1, -1, -1, 0]
    (a,) = assign_max_iou([CANDIDATES], [GT], labels(1), ignore_boxes=ignore, ignore_iof_thr=1.0)
    assert a.label.tolist() == [1, 1, 0, 0, 0]
    (a,) = assign_max_iou([CANDIDATES], [GT], labels(1), ignore_boxes=[torch.zeros(0, 4)])
    assert a.label.tolist() == [1, 1, 0, 0, 0]


def test_ignored_candidates_leave_the_low_quality_rule() -> None:
    cand = torch.tensor([[0.0, 0.0, 10.0, 4.0], [0.0, 0.0, 10.0, 3.0], [0.0, 0.0, 10.0, 1.0]])
    kwargs = {"pos_thr": 0.7, "neg_thr": 0.35, "low_quality": True}
    (a,) = assign_max_iou([cand], [GT], labels(1), **kwargs)
    assert a.label.tolist() == [1, 0, 0]
    # A region over all candidates: nothing left to match.
    ignore = [torch.tensor([[0.0, 0.0, 10.0, 4.0]])]
    (a,) = assign_max_iou([cand], [GT], labels(1), ignore_boxes=ignore, **kwargs)
    assert a.label.tolist() == [-1, -1, -1]
    # A region over a quarter of the best candidate only: the next best takes the match.
    ignore = [torch.tensor([[0.0, 3.0, 10.0, 4.0]])]
    (a,) = assign_max_iou(
        [cand], [GT], labels(1), ignore_boxes=ignore, ignore_iof_thr=0.2, **kwargs
    )
    assert a.label.tolist() == [-1, 1, 0]


def test_batched_equals_per_image() -> None:
    g = torch.Generator().manual_seed(2)
    cands = [random_boxes(n, g) for n in (30, 0, 50, 20)]
    gts = [random_boxes(n, g) for n in (3, 2, 0, 7)]
    gt_labels = [torch.randint(1, 9, (len(b),), generator=g) for b in gts]
    ignore = [random_boxes(n, g) for n in (1, 0, 2, 0)]
    kwargs = {"pos_thr": 0.6, "neg_thr": (0.1, 0.4), "low_quality": True, "ignore_boxes": ignore}
    batched = assign_max_iou(cands, gts, gt_labels, **kwargs)
    for i in range(4):
        single = assign_max_iou(
            [cands[i]], [gts[i]], [gt_labels[i]], **{**kwargs, "ignore_boxes": [ignore[i]]}
        )
        assert_same(batched[i], single[0])


@pytest.mark.parametrize("block_elements", [1, 400])
def test_cpu_blocks_give_the_same_answer(
    monkeypatch: pytest.MonkeyPatch, block_elements: int
) -> None:
    # Blocks of images padded to their own sizes: uneven candidate and ground-truth counts.
    g = torch.Generator().manual_seed(4)
    cands = [random_boxes(n, g) for n in (30, 0, 50, 20, 5)]
    gts = [random_boxes(n, g) for n in (3, 2, 0, 7, 1)]
    gt_labels = [torch.randint(1, 9, (len(b),), generator=g) for b in gts]
    ignore = [random_boxes(n, g) for n in (1, 0, 2, 0, 1)]
    kwargs = {"pos_thr": 0.6, "neg_thr": (0.1, 0.4), "low_quality": True, "ignore_boxes": ignore}
    whole = assign_max_iou(cands, gts, gt_labels, **kwargs)
    monkeypatch.setattr(_batch, "CPU_BLOCK_ELEMENTS", block_elements)
    for a, b in zip(whole, assign_max_iou(cands, gts, gt_labels, **kwargs), strict=True):
        assert_same(a, b)


def test_chunking_gives_the_same_answer() -> None:
    g = torch.Generator().manual_seed(3)
    cands = [random_boxes(300, g), random_boxes(200, g)]
    gts = [random_boxes(40, g), random_boxes(13, g)]
    gts[0][20:30] = gts[0][:10]  # ties across chunks: the first ground truth must win
    gt_labels = [torch.randint(1, 9, (len(b),), generator=g) for b in gts]
    whole = assign_max_iou(cands, gts, gt_labels, low_quality=True, chunk_size=1000)
    for chunk in (1, 7):
        chunked = assign_max_iou(cands, gts, gt_labels, low_quality=True, chunk_size=chunk)
        for a, b in zip(whole, chunked, strict=True):
            assert_same(a, b)


def test_invalid_input() -> None:
    bad = CANDIDATES.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"candidates\[0\]"):
        assign_max_iou([bad], [GT], labels(1))
    with pytest.raises(ValueError, match=r"gt_boxes\[1\]"):
        assign_max_iou([CANDIDATES] * 2, [GT, GT * float("inf")], labels(1, 1))
    with pytest.raises(ValueError, match="ignore_boxes"):
        assign_max_iou([CANDIDATES], [GT], labels(1), ignore_boxes=[GT * float("nan")])
    with pytest.raises(ValueError, match="one entry per image"):
        assign_max_iou([CANDIDATES], [GT, GT], labels(1, 1))
    with pytest.raises(ValueError, match="gt_labels"):
        assign_max_iou([CANDIDATES], [GT], [torch.tensor([1.0])])
    with pytest.raises(ValueError, match="gt_labels"):
        assign_max_iou([CANDIDATES], [GT], labels(2))
    with pytest.raises(ValueError, match="shape"):
        assign_max_iou([CANDIDATES[:, :3]], [GT], labels(1))
    with pytest.raises(ValueError, match="neg_lo"):
        assign_max_iou([CANDIDATES], [GT], labels(1), pos_thr=0.3, neg_thr=0.5)
    with pytest.raises(ValueError, match="chunk_size"):
        assign_max_iou([CANDIDATES], [GT], labels(1), chunk_size=0)


def test_assigner_interface() -> None:
    assigner = MaxIoUAssigner(pos_thr=0.5, neg_thr=(0.1, 0.5))
    assert isinstance(assigner, Assigner)
    (a,) = assigner([CANDIDATES], [GT], labels(1), num_per_level=[5])
    assert a.label.tolist() == [1, 1, 0, -1, -1]
