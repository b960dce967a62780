"""Max-IoU assignment: exact small cases, edge cases, and equality with torchvision's Matcher."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torchvision.models.detection._utils import Matcher

from hardmine.assign import MaxIoUAssigner, _batch, assign_max_iou
from hardmine.boxes import box_iou, coordinate_limit
from hardmine.errors import NonFiniteError
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


def reference_max_iou(
    cands: Tensor,
    gt: Tensor,
    gt_labels: Tensor,
    *,
    pos_thr: float,
    neg_lo: float,
    neg_hi: float,
    low_quality: bool,
    ignore: Tensor | None,
) -> Assignment:
    """The rule of ``assign_max_iou`` for one image, written plainly: ``max`` over the full
    ``[G, N]`` IoU matrix and ``masked_fill`` (the computation before the fast path)."""
    n = cands.shape[0]
    ignored = torch.zeros(n, dtype=torch.bool)
    if ignore is not None and len(ignore):
        from hardmine.boxes import box_iof

        ignored = box_iof(cands, ignore).amax(dim=1) > 0.5
    if gt.shape[0] == 0 or n == 0:
        label = torch.zeros(n, dtype=torch.int8).masked_fill_(ignored, -1)
        zeros = torch.zeros(n, dtype=torch.int64)
        return Assignment(label, zeros, torch.zeros(n, dtype=torch.float32), zeros)
    iou = box_iou(gt, cands)  # [G, N]
    best, best_gt = iou.max(dim=0)
    label = torch.full((n,), -1, dtype=torch.int8)
    label.masked_fill_((best >= neg_lo) & (best < neg_hi), 0)
    positive = best >= pos_thr
    if low_quality:
        masked = iou.masked_fill(ignored[None], -1.0)
        gt_best = masked.amax(dim=1, keepdim=True)
        positive |= ((masked == gt_best) & (gt_best > 0)).any(dim=0)
    label.masked_fill_(positive, 1)
    label.masked_fill_(ignored, -1)
    gt_class = torch.where(label == 1, gt_labels[best_gt], 0)
    return Assignment(label, best_gt, best, gt_class)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_equals_the_plain_rule_on_random_input_with_ties(dtype: torch.dtype) -> None:
    # Integer boxes give many equal IoUs (ties across ground truths, and with the thresholds);
    # some images have no ground truth, no candidates, or ignore regions.
    g = torch.Generator().manual_seed(11)
    for trial in range(12):
        sizes = torch.randint(0, 120, (4,), generator=g).tolist()
        num_gt = torch.randint(0, 9, (4,), generator=g).tolist()
        cands = [random_boxes(n, g).round() for n in sizes]
        gts = [random_boxes(k, g).round() for k in num_gt]
        gts[0] = torch.cat([gts[0], gts[0]])  # duplicated ground truths: the first must win
        gt_labels = [torch.randint(1, 9, (len(b),), generator=g) for b in gts]
        ignore = [random_boxes(int(k), g) for k in torch.randint(0, 2, (4,), generator=g)]
        settings = {"pos_thr": 0.5, "neg_lo": 0.1 * (trial % 2), "neg_hi": 0.4 + 0.1 * (trial % 2)}
        low_quality = trial % 3 == 0
        use_ignore = trial % 4 < 2
        got = assign_max_iou(
            [c.to(dtype) for c in cands],
            [b.to(dtype) for b in gts],
            gt_labels,
            pos_thr=settings["pos_thr"],
            neg_thr=(settings["neg_lo"], settings["neg_hi"]),
            low_quality=low_quality,
            ignore_boxes=[i.to(dtype) for i in ignore] if use_ignore else None,
            chunk_size=3,
        )
        for i, a in enumerate(got):
            ref = reference_max_iou(
                cands[i].to(dtype),
                gts[i].to(dtype),
                gt_labels[i],
                **settings,
                low_quality=low_quality,
                ignore=ignore[i].to(dtype) if use_ignore else None,
            )
            assert torch.equal(a.label, ref.label), (trial, i)
            assert torch.equal(a.gt_index, ref.gt_index), (trial, i)
            assert torch.equal(a.max_iou.to(ref.max_iou.dtype), ref.max_iou), (trial, i)
            assert torch.equal(a.gt_class, ref.gt_class), (trial, i)


def test_best_of_chunk_is_max_with_the_first_index() -> None:
    g = torch.Generator().manual_seed(5)
    for shape in [(1, 1, 5), (3, 7, 40), (2, 64, 100)]:
        iou = (torch.rand(shape, generator=g) * 4).floor() / 4  # many exact ties, zeros, ones
        for dtype in (torch.float32, torch.float64):
            expected_value, expected_index = iou.to(dtype).max(dim=1)
            value, index = _batch.best_of_chunk(iou.to(dtype, copy=True))  # overwrites its input
            assert torch.equal(value, expected_value) and torch.equal(index, expected_index)


def test_finiteness_is_checked_per_image_and_overflowing_boxes_are_refused() -> None:
    # The batch check takes the largest |coordinate|: a non-finite one names the image; so does
    # one beyond coordinate_limit, whose areas overflow float32 (a ground truth 6e38 wide made
    # ATSS fail with an index error, and every IoU with a 2e19 one was 0).
    bad = CANDIDATES.clone()
    bad[1, 3] = float("-inf")
    with pytest.raises(ValueError, match=r"candidates\[2\]: contains NaN or infinite"):
        assign_max_iou([CANDIDATES, CANDIDATES, bad], [GT] * 3, labels(1, 1, 1))
    limit = coordinate_limit(torch.float32)
    assert limit == 2.0**62
    for coordinate in (3e38, 2 * limit):
        huge = torch.tensor([[0.0, 0.0, coordinate, coordinate]])
        with pytest.raises(ValueError, match=r"gt_boxes\[1\]: coordinates up to .* overflow"):
            assign_max_iou([CANDIDATES] * 2, [GT, huge], labels(1, 1))
    wide = torch.tensor([[-3e38, 5.0, 3e38, 5.0]])
    with pytest.raises(NonFiniteError, match=r"candidates\[0\]: .* float32"):
        assign_max_iou([wide], [GT], labels(1))
    # float64 ground truths beside float32 candidates are checked in float32, the type the
    # padded batch computes in.
    with pytest.raises(ValueError, match=r"gt_boxes\[0\]: coordinates up to 1e\+300"):
        assign_max_iou(
            [CANDIDATES], [torch.tensor([[0.0, 0.0, 1e300, 5.0]], dtype=torch.float64)], labels(1)
        )
    # At the limit, the geometry is finite and the answer exact: the box is far from all.
    far = torch.full((3, 4), limit)
    (a,) = assign_max_iou([far], [GT], labels(1))
    assert a.label.tolist() == [0, 0, 0] and a.max_iou.tolist() == [0.0, 0.0, 0.0]
    half = CANDIDATES.half() * 1000  # float16 coordinates are checked against float32's limit
    (a,) = assign_max_iou([half], [GT.half()], labels(1))
    assert a.label.shape == (5,)
