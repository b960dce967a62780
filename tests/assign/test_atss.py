"""ATSS: MMDetection's own fixture, a per-GT / per-level reference transcription, edge cases."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from hardmine.assign import ATSSAssigner, _batch, assign_atss, atss
from hardmine.boxes import box_centers, box_iof, box_iou
from hardmine.structures import Assigner, Assignment

# MMDetection's test fixture (tests/test_models/test_task_modules/test_assigners/).
PRIORS = torch.tensor(
    [[0.0, 0.0, 10.0, 10.0], [10.0, 10.0, 20.0, 20.0], [5.0, 5.0, 15.0, 15.0], [32, 32, 38, 42]]
)
GTS = torch.tensor([[0.0, 0.0, 10.0, 9.0], [0.0, 10.0, 10.0, 19.0]])
GT_LABELS = torch.tensor([2, 3])


def reference_atss(
    anchors: Tensor,
    gts: Tensor,
    gt_labels: Tensor,
    num_per_level: list[int],
    *,
    topk: int = 9,
    ignore: Tensor | None = None,
    ignore_iof_thr: float = 0.5,
    margin: float = 0.01,
) -> Assignment:
    """One image, loops over ground truths and levels, as MMDetection's ``ATSSAssigner.assign``.

    Distance ties go to the lower index (a stable sort) where MMDetection's ``topk`` leaves them
    unspecified; on continuous random input there are none.
    """
    n, g = len(anchors), len(gts)
    ignored = torch.zeros(n, dtype=torch.bool)
    if ignore is not None and len(ignore):
        ignored = box_iof(anchors, ignore).amax(dim=1) > ignore_iof_thr
    label = torch.where(ignored, -1, 0).to(torch.int8)
    if g == 0:
        zeros = torch.zeros(n, dtype=torch.int64)
        return Assignment(label, zeros, torch.zeros(n), zeros)
    iou = box_iou(gts, anchors)  # [G, N]
    centers, gt_centers = box_centers(anchors), box_centers(gts)
    matched: dict[int, tuple[float, int]] = {}
    for j in range(g):
        distance = (centers - gt_centers[j]).pow(2).sum(-1).sqrt()
        distance[ignored] = 1e8
        candidates = []
        start = 0
        for count in num_per_level:
            order = torch.sort(distance[start : start + count], stable=True).indices
            candidates += (order[: min(topk, count)] + start).tolist()
            start += count
        values = iou[j, candidates]
        threshold = values.mean() + values.std()
        for a in candidates:
            cx, cy = centers[a].tolist()
            x1, y1, x2, y2 = gts[j].tolist()
            inside = min(cx - x1, cy - y1, x2 - cx, y2 - cy) > margin
            if (
                iou[j, a] >= threshold
                and inside
                and (a not in matched or iou[j, a] > matched[a][0])
            ):
                matched[a] = (iou[j, a].item(), j)
    best_iou, best_gt = iou.max(dim=0)
    gt_index, max_iou, gt_class = (
        best_gt.clone(),
        best_iou.clone(),
        torch.zeros(n, dtype=torch.int64),
    )
    for a, (value, j) in matched.items():
        label[a], gt_index[a], max_iou[a], gt_class[a] = 1, j, value, gt_labels[j]
    return Assignment(label, gt_index, max_iou, gt_class)


def random_boxes(n: int, generator: torch.Generator, size: float, extent: float) -> Tensor:
    xy = torch.rand(n, 2, generator=generator) * extent
    wh = (torch.rand(n, 2, generator=generator) + 0.5) * size
    return torch.cat([xy - wh / 2, xy + wh / 2], dim=1)


def random_anchors(num_per_level: list[int], generator: torch.Generator) -> Tensor:
    return torch.cat(
        [random_boxes(n, generator, 8.0 * 2**i, 128.0) for i, n in enumerate(num_per_level)]
    )


def grid_anchors(sizes: list[int], strides: list[int], scales: list[float]) -> Tensor:
    """Anchors on a grid, ``len(scales)`` per location (they tie in distance), levels in order."""
    levels = []
    for size, stride in zip(sizes, strides, strict=True):
        c = (torch.arange(size) + 0.5) * stride
        cy, cx = torch.meshgrid(c, c, indexing="ij")
        ctr = torch.stack([cx, cy], dim=-1).reshape(-1, 1, 2)  # [L, 1, 2]
        half = torch.tensor(scales)[None, :, None] * stride * 2  # [1, A, 1]
        levels.append(torch.cat([ctr - half, ctr + half], dim=-1).reshape(-1, 4))
    return torch.cat(levels)


def assert_same(a: Assignment, b: Assignment) -> None:
    assert torch.equal(a.label, b.label)
    pos = a.positive
    assert torch.equal(a.gt_index[pos], b.gt_index[pos])
    assert torch.equal(a.gt_class, b.gt_class)
    assert torch.allclose(a.max_iou, b.max_iou)


def test_mmdetection_fixture() -> None:
    (a,) = assign_atss([PRIORS], [GTS], [GT_LABELS], num_per_level=[4])
    assert a.label.tolist() == [1, 0, 0, 0]
    assert a.gt_index[0] == 0 and a.gt_class.tolist() == [2, 0, 0, 0]
    assert a.label.dtype == torch.int8 and a.gt_index.dtype == torch.int64
    assert a.gt_class.dtype == torch.int64 and a.max_iou.dtype == torch.float32
    assert_same(a, reference_atss(PRIORS, GTS, GT_LABELS, [4]))


def test_mmdetection_fixture_with_ignore() -> None:
    # MMDetection's version of this test leaves ignoring off (its ignore_iof_thr defaults to -1)
    # and expects the same picks; with ignoring on, the last prior (80 % covered) is ignored.
    priors = PRIORS.clone()
    priors[3] = torch.tensor([30.0, 32.0, 40.0, 42.0])
    ignore = [torch.tensor([[30.0, 30.0, 40.0, 40.0]])]
    (a,) = assign_atss([priors], [GTS], [GT_LABELS], num_per_level=[4], ignore_iof_thr=1.0)
    assert a.label.tolist() == [1, 0, 0, 0]
    (a,) = assign_atss([priors], [GTS], [GT_LABELS], num_per_level=[4], ignore_boxes=ignore)
    assert a.label.tolist() == [1, 0, 0, -1]
    assert a.gt_index[0] == 0
    assert_same(a, reference_atss(priors, GTS, GT_LABELS, [4], ignore=ignore[0]))


def test_no_ground_truth() -> None:
    empty, no_labels = torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)
    (a,) = assign_atss([PRIORS], [empty], [no_labels], num_per_level=[4])
    assert a.label.tolist() == [0, 0, 0, 0]
    assert a.gt_index.tolist() == [0] * 4 and a.gt_class.tolist() == [0] * 4
    assert a.max_iou.tolist() == [0.0] * 4
    ignore = [torch.tensor([[30.0, 30.0, 40.0, 42.0]])]
    (a,) = assign_atss([PRIORS], [empty], [no_labels], num_per_level=[4], ignore_boxes=ignore)
    assert a.label.tolist() == [0, 0, 0, -1]


@pytest.mark.parametrize("num_gt", [0, 2])
def test_no_anchors(num_gt: int) -> None:
    out = assign_atss(
        [torch.zeros(0, 4)] * 2,
        [GTS[:num_gt]] * 2,
        [GT_LABELS[:num_gt]] * 2,
        num_per_level=[0, 0],
        ignore_boxes=[torch.tensor([[30.0, 30.0, 40.0, 40.0]])] * 2,
    )
    assert [a.num_candidates for a in out] == [0, 0]
    assert out[0].label.dtype == torch.int8
    assert assign_atss([], [], [], num_per_level=[4]) == []


def test_all_equal_ious() -> None:
    # Nine copies of one anchor: equal IoUs (0.1 rounds the float mean above itself) and equal
    # distances. The threshold equals the IoU, so all are positive.
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    anchor = torch.tensor([[0.0, 0.0, 10.0, 1.0]])
    anchors = torch.cat([anchor.repeat(9, 1), torch.tensor([[50.0, 50.0, 60.0, 60.0]])])
    anchors[:9, 1] += 4.5  # centre (5, 5), IoU 0.1
    anchors[:9, 3] += 4.5
    (a,) = assign_atss([anchors], [gt], [torch.tensor([1])], num_per_level=[10])
    assert a.label.tolist() == [1] * 9 + [0]
    assert torch.allclose(a.max_iou[:9], torch.tensor(0.1))
    # MMDetection's arithmetic (mean + std in float32) rejects them all here.
    assert not reference_atss(anchors, gt, torch.tensor([1]), [10]).positive.any()


def test_single_candidate() -> None:
    (a,) = assign_atss([GTS[:1]], [GTS[:1]], [GT_LABELS[:1]], num_per_level=[1])
    assert a.label.tolist() == [1]


def test_degenerate_boxes() -> None:
    anchors = torch.tensor(
        [
            [5.0, 4.5, 5.0, 4.5],  # zero area at the GT centre: IoU 0, so below the threshold
            [-40.0, -40.0, -30.0, -30.0],  # off the image
            [0.0, 0.0, 10.0, 9.0],
            [1.0, 1.0, 9.0, 8.0],
        ]
    )
    gts = torch.tensor([[0.0, 0.0, 10.0, 9.0], [60.0, 60.0, 60.0, 70.0]])  # the second: no area
    (a,) = assign_atss([anchors], [gts], [GT_LABELS], num_per_level=[4])
    assert a.label.tolist() == [0, 0, 1, 0]
    assert_same(a, reference_atss(anchors, gts, GT_LABELS, [4]))


def far_anchors(n: int) -> Tensor:
    """``n`` anchors overlapping nothing near the origin: they pull the IoU threshold down."""
    return torch.tensor([[100.0, 100.0, 110.0, 110.0]]).repeat(n, 1) + 20 * torch.arange(n)[:, None]


def test_center_must_lie_inside() -> None:
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    # Both have IoU 0.5; the first one's centre lies 0.005 inside the GT: too close (margin 0.01).
    anchors = torch.cat(
        [torch.tensor([[-9.99, 0.0, 10.0, 10.0], [-9.9, 0.0, 10.0, 10.0]]), far_anchors(6)]
    )
    (a,) = assign_atss([anchors], [gt], [torch.tensor([1])], num_per_level=[8])
    assert a.label.tolist() == [0, 1] + [0] * 6
    (a,) = assign_atss([anchors], [gt], [torch.tensor([1])], num_per_level=[8], center_margin=0.0)
    assert a.label.tolist() == [1, 1] + [0] * 6


def test_overlapping_gts_take_the_highest_iou() -> None:
    gts = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 12.0], [0.0, 0.0, 10.0, 10.0]])
    anchors = torch.cat(
        [torch.tensor([[0.0, 0.0, 10.0, 11.0], [0.0, 0.0, 10.0, 10.0]]), far_anchors(6)]
    )
    gt_labels = torch.tensor([1, 2, 3])
    (a,) = assign_atss([anchors], [gts], [gt_labels], num_per_level=[8])
    assert a.label.tolist() == [1, 1] + [0] * 6
    assert a.gt_index[:2].tolist() == [1, 0]  # GT 2 ties GT 0 on anchor 1: the first wins
    assert a.gt_class[:2].tolist() == [2, 1]
    assert_same(a, reference_atss(anchors, gts, gt_labels, [8]))


@pytest.mark.parametrize("topk", [1, 3, 9])
def test_matches_reference_on_random_input(topk: int) -> None:
    g = torch.Generator().manual_seed(topk)
    num_per_level = [60, 30, 12, 5]
    for _ in range(3):
        anchors = [random_anchors(num_per_level, g) for _ in range(3)]
        gts = [random_boxes(n, g, 24.0, 128.0) for n in (5, 0, 11)]
        labels = [torch.randint(1, 9, (len(b),), generator=g) for b in gts]
        ignore = [random_boxes(n, g, 30.0, 128.0) for n in (2, 1, 0)]
        out = assign_atss(
            anchors, gts, labels, num_per_level=num_per_level, topk=topk, ignore_boxes=ignore
        )
        for i in range(3):
            ref = reference_atss(
                anchors[i], gts[i], labels[i], num_per_level, topk=topk, ignore=ignore[i]
            )
            assert_same(out[i], ref)
        assert sum(int(a.positive.sum()) for a in out) > 0


def test_grid_anchors_with_ties_match_reference() -> None:
    num_per_level = [8 * 8 * 3, 4 * 4 * 3]
    anchors = grid_anchors([8, 4], [8, 16], [1.0, 1.26, 1.59])
    gts = torch.tensor([[8.0, 8.0, 40.0, 40.0], [30.0, 20.0, 50.0, 60.0], [0.0, 0.0, 64.0, 64.0]])
    labels = torch.tensor([1, 2, 3])
    for topk_per in ("anchor", "location"):
        (a,) = assign_atss(
            [anchors],
            [gts],
            [labels],
            num_per_level=num_per_level,
            topk=4,
            anchors_per_location=3,
            topk_per=topk_per,
        )
        ref = reference_atss(
            anchors, gts, labels, num_per_level, topk=12 if topk_per == "location" else 4
        )
        assert_same(a, ref)
        assert a.positive.any()


def test_large_levels_match_reference() -> None:
    # Levels of at least 256 * k anchors take the CPU's blocked search for the nearest ones
    # (atss._nearest_blocked); grid anchors and whole-pixel boxes make ties in distance.
    num_per_level = [32 * 32 * 3, 8 * 8 * 3]
    anchors = grid_anchors([32, 8], [8, 32], [1.0, 1.26, 1.59])
    gts = torch.tensor(
        [
            [8.0, 8.0, 40.0, 40.0],
            [30.0, 20.0, 50.0, 60.0],
            [0.0, 0.0, 256.0, 256.0],
            [100, 4, 180, 9],
        ]
    )
    labels = torch.tensor([1, 2, 3, 4])
    ignore = torch.tensor([[0.0, 200.0, 60.0, 256.0]])
    for topk, topk_per in ((9, "anchor"), (4, "location")):
        (a,) = assign_atss(
            [anchors],
            [gts],
            [labels],
            num_per_level=num_per_level,
            topk=topk,
            anchors_per_location=3,
            topk_per=topk_per,
            ignore_boxes=[ignore],
        )
        k = topk * 3 if topk_per == "location" else topk
        assert_same(a, reference_atss(anchors, gts, labels, num_per_level, topk=k, ignore=ignore))
        assert a.positive.any()


@pytest.mark.parametrize("n", [2304, 5000, 16800])
def test_blocked_nearest_is_a_stable_sort(n: int) -> None:
    # The blocked search returns the k nearest sorted by (distance, index), as topk returns long
    # rows on the CPU (the threshold's sums depend on the order to the last bit).
    g = torch.Generator().manual_seed(n)
    distance = (torch.rand(2, 3, n, generator=g) * 50).round()  # many ties
    distance[0, 0, -5:] = 0.0  # the nearest in the last, partial block
    distance[1, 0] = 7.0  # all tied
    nearest = atss._nearest_blocked(distance, 9)
    assert torch.equal(nearest, distance.sort(dim=-1, stable=True).indices[..., :9])


def test_float64_matches_reference() -> None:
    # Float64 distances leave no room for the index in the ranking key: the other exact path.
    num_per_level = [8 * 8 * 3, 4 * 4 * 3]
    anchors = grid_anchors([8, 4], [8, 16], [1.0, 1.26, 1.59]).double()
    gts = torch.tensor([[8.0, 8.0, 40.0, 40.0], [30.0, 20.0, 50.0, 60.0]], dtype=torch.float64)
    labels = torch.tensor([1, 2])
    (a,) = assign_atss([anchors], [gts], [labels], num_per_level=num_per_level, topk=4)
    assert a.max_iou.dtype == torch.float64 and a.positive.any()
    assert_same(a, reference_atss(anchors, gts, labels, num_per_level, topk=4))
    (b,) = assign_atss(
        [anchors.float()], [gts.float()], [labels], num_per_level=num_per_level, topk=4
    )
    assert torch.equal(a.label, b.label) and torch.equal(a.gt_index, b.gt_index)


@pytest.mark.parametrize("block_elements", [1, 3000])
def test_cpu_blocks_give_the_same_answer(
    monkeypatch: pytest.MonkeyPatch, block_elements: int
) -> None:
    g = torch.Generator().manual_seed(11)
    num_per_level = [50, 20, 6]
    anchors = [random_anchors(num_per_level, g) for _ in range(5)]
    gts = [random_boxes(n, g, 24.0, 128.0) for n in (16, 3, 0, 1, 7)]
    labels = [torch.randint(1, 9, (len(b),), generator=g) for b in gts]
    ignore = [random_boxes(n, g, 30.0, 128.0) for n in (0, 3, 1, 0, 2)]
    whole = assign_atss(anchors, gts, labels, num_per_level=num_per_level, ignore_boxes=ignore)
    monkeypatch.setattr(_batch, "CPU_BLOCK_ELEMENTS", block_elements)
    blocked = assign_atss(anchors, gts, labels, num_per_level=num_per_level, ignore_boxes=ignore)
    for a, b in zip(whole, blocked, strict=True):
        for field in ("label", "gt_index", "max_iou", "gt_class"):
            assert torch.equal(getattr(a, field), getattr(b, field))


def test_batched_equals_per_image_and_chunking() -> None:
    g = torch.Generator().manual_seed(7)
    num_per_level = [50, 20, 6]
    anchors = [random_anchors(num_per_level, g) for _ in range(3)]
    gts = [random_boxes(n, g, 24.0, 128.0) for n in (16, 3, 0)]
    labels = [torch.randint(1, 9, (len(b),), generator=g) for b in gts]
    ignore = [random_boxes(n, g, 30.0, 128.0) for n in (0, 3, 1)]
    batched = assign_atss(anchors, gts, labels, num_per_level=num_per_level, ignore_boxes=ignore)
    for chunk_size in (1, 6):
        chunked = assign_atss(
            anchors,
            gts,
            labels,
            num_per_level=num_per_level,
            ignore_boxes=ignore,
            chunk_size=chunk_size,
        )
        for a, b in zip(batched, chunked, strict=True):
            for field in ("label", "gt_index", "max_iou", "gt_class"):
                assert torch.equal(getattr(a, field), getattr(b, field))
    for i in range(3):
        (single,) = assign_atss(
            [anchors[i]],
            [gts[i]],
            [labels[i]],
            num_per_level=num_per_level,
            ignore_boxes=[ignore[i]],
        )
        for field in ("label", "gt_index", "max_iou", "gt_class"):
            assert torch.equal(getattr(batched[i], field), getattr(single, field))


def test_invalid_input() -> None:
    bad = PRIORS.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"candidates\[0\]"):
        assign_atss([bad], [GTS], [GT_LABELS], num_per_level=[4])
    with pytest.raises(ValueError, match="gt_boxes"):
        assign_atss([PRIORS], [GTS * float("nan")], [GT_LABELS], num_per_level=[4])
    with pytest.raises(ValueError, match="sum"):
        assign_atss([PRIORS], [GTS], [GT_LABELS], num_per_level=[3])
    with pytest.raises(ValueError, match="topk"):
        assign_atss([PRIORS], [GTS], [GT_LABELS], num_per_level=[4], topk=0)
    with pytest.raises(ValueError, match="num_per_level"):
        ATSSAssigner()([PRIORS], [GTS], [GT_LABELS])


def test_assigner_interface() -> None:
    assigner = ATSSAssigner(topk=9)
    assert isinstance(assigner, Assigner)
    (a,) = assigner([PRIORS], [GTS], [GT_LABELS], num_per_level=[4])
    assert a.label.tolist() == [1, 0, 0, 0]


def test_topk_counts_anchors_by_default_and_locations_by_name() -> None:
    """D4: the paper's "k anchor boxes" per level is the default, whatever the anchors per
    location; the authors' code's k locations (k x A anchors) is ``topk_per="location"``."""
    assert ATSSAssigner().topk_per == "anchor"
    # A 2 x 2 grid of locations, three square anchors each (half sizes 4, 8, 12).
    locations = torch.tensor([[8.0, 8.0], [24.0, 8.0], [8.0, 24.0], [24.0, 24.0]])
    half = torch.tensor([4.0, 8.0, 12.0])  # [A]
    centres = locations[:, None].expand(-1, 3, -1)  # [4, A, 2]
    anchors = torch.cat([centres - half[:, None], centres + half[:, None]], -1).reshape(-1, 4)
    gt, labels = torch.tensor([[0.0, 0.0, 10.0, 20.0]]), [torch.tensor([1])]
    kw = {"num_per_level": [12], "topk": 3, "anchors_per_location": 3}
    # k = 3 anchors: the nearest location's three (IoUs 0.222, 0.541, 0.347), threshold
    # 0.530: only the middle one.
    (by_anchor,) = assign_atss([anchors], [gt], labels, **kw)
    assert by_anchor.label.tolist() == [0, 1] + [0] * 10
    (same,) = ATSSAssigner(topk=3, anchors_per_location=3)(
        [anchors], [gt], labels, num_per_level=[12]
    )
    assert torch.equal(same.label, by_anchor.label)
    # k = 3 locations: nine anchors (locations 0, 2, 1 by distance), threshold 0.337: the
    # IoU-0.347 anchor passes too. Exactly topk = 9 anchors.
    (by_location,) = assign_atss([anchors], [gt], labels, topk_per="location", **kw)
    assert by_location.label.tolist() == [0, 1, 1] + [0] * 9
    (nine,) = assign_atss([anchors], [gt], labels, num_per_level=[12], topk=9)
    assert torch.equal(by_location.label, nine.label)
    with pytest.raises(ValueError, match="topk_per must be one of"):
        ATSSAssigner(topk_per="locations")


def torchvision_anchors(
    image: tuple[int, int], strides: list[int], sizes: list[tuple[int, ...]], ratios: tuple
) -> tuple[Tensor, list[int]]:
    """torchvision's ``AnchorGenerator`` on one image: anchors and their count per level."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList

    generator = AnchorGenerator(tuple(sizes), (ratios,) * len(sizes))
    images = ImageList(torch.zeros(1, 3, *image), [image])
    features = [torch.zeros(1, 1, -(-image[0] // s), -(-image[1] // s)) for s in strides]
    (anchors,) = generator(images, features)
    per_location = len(sizes[0]) * len(ratios)
    return anchors, [f.shape[-1] * f.shape[-2] * per_location for f in features]


GRID_CASES = {
    # A = 1, two levels of at least 256 * 9 anchors (the blocked nearest search) and small ones
    "one_per_location": ((400, 520), [4, 8, 16, 32], [(16,), (32,), (64,), (128,)], (1.0,)),
    # torchvision's RetinaNet: 9 per location
    "nine_per_location": (
        (256, 320),
        [8, 16, 32, 64, 128],
        [(s, round(s * 2 ** (1 / 3)), round(s * 2 ** (2 / 3))) for s in (32, 64, 128, 256, 512)],
        (0.5, 1.0, 2.0),
    ),
}


@pytest.mark.parametrize("case", list(GRID_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("grid_min", [atss._GRID_MIN_ANCHORS, 0])
def test_grid_path_equals_generic_path(
    monkeypatch: pytest.MonkeyPatch, case: str, dtype: torch.dtype, grid_min: int
) -> None:
    # Anchors on a grid (atss._find_grids) take separable distances and intersections, and their
    # large levels a search for the nearest without distances: the same bits as the generic
    # path, which takes them when no level is found to be a grid. grid_min = 0: the small levels
    # take the separable path too.
    monkeypatch.setattr(atss, "_GRID_MIN_ANCHORS", grid_min)
    anchors, num_per_level = torchvision_anchors(*GRID_CASES[case])
    assert all(g is not None for g in atss._find_grids(anchors[None], num_per_level))
    height, width = GRID_CASES[case][0]
    g = torch.Generator().manual_seed(3)
    gts = [random_boxes(n, g, 60.0, float(min(height, width))) for n in (0, 1, 130)]
    gts[2][:5] = gts[2][:5].round()  # whole pixels: ties with the grid's centres
    labels = [torch.randint(1, 9, (len(b),), generator=g) for b in gts]
    ignore = [random_boxes(n, g, 40.0, 200.0) for n in (1, 0, 2)]
    anchors = anchors.to(dtype)
    per_image = [anchors.clone() for _ in gts]  # a stacked copy per image, as a model passes them
    gts = [b.to(dtype) for b in gts]
    for images, ign, chunk_size in (([anchors] * 3, None, 64), (per_image, ignore, 7)):
        kwargs = dict(num_per_level=num_per_level, ignore_boxes=ign, chunk_size=chunk_size)
        grid = assign_atss(images, gts, labels, **kwargs)
        with monkeypatch.context() as m:
            m.setattr(atss, "_find_grids", lambda a, n: [None] * len(n))
            generic = assign_atss(images, gts, labels, **kwargs)
        for a, b in zip(grid, generic, strict=True):
            for field in ("label", "gt_index", "max_iou", "gt_class"):
                assert torch.equal(getattr(a, field), getattr(b, field)), field
        assert grid[2].positive.sum() > 0


def test_grids_are_verified() -> None:
    anchors, num_per_level = torchvision_anchors(*GRID_CASES["nine_per_location"])
    found = atss._find_grids(anchors[None], num_per_level)
    assert [(g.height, g.width, g.per_location) for g in found] == [
        (32, 40, 9),
        (16, 20, 9),
        (8, 10, 9),
        (4, 5, 9),
        (2, 3, 9),
    ]
    # Any anchor out of the pattern (one coordinate, one image, a permutation) loses its level.
    moved = anchors.clone()
    moved[num_per_level[0] + 100, 2] += 1
    other = anchors.clone()
    other[5, 1] = -0.0 if other[5, 1] == 0 else other[5, 1] + 0.5
    shuffled = anchors.clone()
    shuffled[: num_per_level[0]] = shuffled[torch.randperm(num_per_level[0])]
    assert atss._find_grids(moved[None], num_per_level)[1] is None
    assert atss._find_grids(torch.stack([anchors, other]), num_per_level)[0] is None
    assert atss._find_grids(shuffled[None], num_per_level)[0] is None
    assert all(g is not None for g in atss._find_grids(moved[None], num_per_level)[2:])
    # MMDetection's fixture and random anchors lie on no grid.
    assert atss._find_grids(PRIORS[None], [4]) == [None]
    g = torch.Generator().manual_seed(0)
    assert atss._find_grids(random_anchors([50, 20], g)[None], [50, 20]) == [None, None]


@pytest.mark.parametrize(
    ("height", "width", "per_location", "k"),
    [(40, 70, 1, 9), (3, 50, 1, 9), (1, 3000, 1, 9), (30, 17, 3, 4), (12, 10, 9, 9), (64, 1, 1, 5)],
)
def test_nearest_on_grid_is_the_blocked_search(
    height: int, width: int, per_location: int, k: int
) -> None:
    # Blocks of a row's locations (the last one short), rows fewer than k, one column; whole
    # numbers make ties, huge ones infinite squared distances, ordered by index like the rest.
    g = torch.Generator().manual_seed(height * width)
    dx = (torch.rand(2, 3, width, per_location, generator=g) * 6).round().square()
    dy = (torch.rand(2, 3, height, per_location, generator=g) * 6).round().square()
    dx[1, 2] = float("inf")
    dy[0, 1, : height // 2] = float("inf")
    grid = atss._Grid(7, height, width, per_location)
    distance = (dx[:, :, None] + dy[:, :, :, None]).flatten(2)  # [2, 3, n]
    expected = distance.sort(dim=-1, stable=True).indices[..., :k] + 7
    assert torch.equal(atss._nearest_on_grid(dx, dy, grid, k), expected)


def window_gts(anchors: Tensor, image: tuple[int, int], generator: torch.Generator) -> list[Tensor]:
    """Ground truths for the windows' tests, per image: random ones and the hard cases."""
    height, width = image
    a = anchors[len(anchors) // 3]  # an anchor inside the image
    special = torch.stack(
        [
            torch.tensor([2000.0, 2000.0, 2100.0, 2100.0]),  # meets no anchor
            torch.tensor([-400.0, -300.0, -200.0, -250.0]),  # meets no anchor either
            torch.tensor([0.0, 0.0, width, height]),  # the whole image
            torch.tensor([-50.0, -50.0, width + 50.0, height + 50.0]),  # beyond it
            torch.tensor([50.0, 60.0, 50.0, 120.0]),  # zero width
            torch.tensor([70.0, 70.0, 70.0, 70.0]),  # a point
            torch.tensor([70.0, 90.0, 130.0, 90.0]),  # zero height
            torch.stack([a[2], a[1], a[2] + 30, a[3]]),  # touches anchor a: IoU exactly 0
            torch.stack([a[0], a[3], a[2], a[3] + 0.5]),  # touches it below
            a.clone(),  # equals it: IoU 1
        ]
    )
    boxes = random_boxes(12, generator, 60.0, float(min(height, width)))
    boxes[:4] = boxes[:4].round()  # whole pixels: ties with the grid's edges and centres
    dup = torch.cat([boxes[:3], boxes[:3]])  # identical ground truths: ties between them
    many = torch.cat([boxes, special, dup, random_boxes(5, generator, 20.0, 100.0)])
    return [many, boxes[4:7], torch.zeros(0, 4), special[[7, 2, 9, 7]], many.flip(0)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_windows_equal_the_matrix(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    # Sparse grid levels' best IoUs and ground truths from windows around each ground truth
    # (atss._windows) equal those of the IoU matrix, bit for bit: forced on every grid level of
    # one anchor per location (small ones too, whatever the windows' size), against the matrix
    # (windows refused) and the generic path (no grids). One level and several; shared anchors
    # and a copy per image; ignore regions; one chunk and several; B = 1 and B > 1.
    cases = {
        "one_level": torchvision_anchors((96, 128), [8], [(32,)], (1.0,)),
        "levels": torchvision_anchors(
            (200, 264), [4, 8, 16, 32], [(16,), (32,), (64,), (96,)], (1.0,)
        ),
        "tall": torchvision_anchors((264, 72), [8, 16], [(24,), (56,)], (0.5,)),
    }
    g = torch.Generator().manual_seed(5)
    calls, positives = [], 0
    real = atss._best_in_windows
    monkeypatch.setattr(atss, "_best_in_windows", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(atss, "_GRID_MIN_ANCHORS", 0)
    monkeypatch.setattr(atss, "_WINDOW_MIN_ANCHORS", 0)
    monkeypatch.setattr(atss, "_WINDOW_MIN_ELEMENTS", 0)
    for (anchors, num_per_level), image in zip(
        cases.values(), [(96, 128), (200, 264), (264, 72)], strict=True
    ):
        gts = window_gts(anchors, image, g)
        labels = [torch.randint(1, 9, (len(b),), generator=g) for b in gts]
        ignore = [random_boxes(n, g, 40.0, 100.0) for n in (1, 0, 2, 0, 1)]
        anchors, gts = anchors.to(dtype), [b.to(dtype) for b in gts]
        for images, ign, chunk_size, take in (
            ([anchors] * 5, None, 64, slice(None)),
            ([anchors.clone() for _ in gts], ignore, 4, slice(None)),
            ([anchors], None, 64, slice(0, 1)),
            ([anchors], None, 64, slice(1, 2)),  # small windows: most anchors outside them
            ([anchors] * 2, None, 64, slice(1, 3)),
            ([anchors] * 2, None, 3, slice(3, 5)),
        ):
            kwargs = dict(num_per_level=num_per_level, ignore_boxes=ign, chunk_size=chunk_size)
            if ign is not None:
                kwargs["ignore_boxes"] = ign[take]
            args = (images[: len(gts[take])], gts[take], labels[take])
            before = len(calls)
            monkeypatch.setattr(atss, "_WINDOW_FRACTION", 1.0)
            windows = assign_atss(*args, **kwargs)
            assert (len(calls) > before) == (dtype != torch.float64)  # float32 keys only
            monkeypatch.setattr(atss, "_WINDOW_FRACTION", -1.0)
            matrix = assign_atss(*args, **kwargs)
            with monkeypatch.context() as m:
                m.setattr(atss, "_find_grids", lambda a, n: [None] * len(n))
                generic = assign_atss(*args, **kwargs)
            for w, mat, gen in zip(windows, matrix, generic, strict=True):
                for field in ("label", "gt_index", "max_iou", "gt_class"):
                    assert torch.equal(getattr(w, field), getattr(mat, field)), field
                    assert torch.equal(getattr(w, field), getattr(gen, field)), field
            positives += sum(int(a.positive.sum()) for a in windows)
    assert positives > 0
    # No window at all: no ground truth, or only ones without area.
    anchors, num_per_level = cases["levels"]
    for gts in ([torch.zeros(0, 4)] * 2, [torch.tensor([[10.0, 10.0, 10.0, 50.0]])]):
        labels = [torch.ones(len(b), dtype=torch.int64) for b in gts]
        args = ([anchors] * len(gts), gts, labels)
        monkeypatch.setattr(atss, "_WINDOW_FRACTION", 1.0)
        windows = assign_atss(*args, num_per_level=num_per_level)
        monkeypatch.setattr(atss, "_WINDOW_FRACTION", -1.0)
        matrix = assign_atss(*args, num_per_level=num_per_level)
        for w, mat in zip(windows, matrix, strict=True):
            for field in ("label", "gt_index", "max_iou", "gt_class"):
                assert torch.equal(getattr(w, field), getattr(mat, field)), field


def test_sparse_grids_are_verified() -> None:
    # Windows need anchors that the boxes meet in a rectangle of cells: x1 and x2 sorted along
    # a row (y1, y2 down a column), positive sizes, float32, and no overflow of areas.
    anchors, num_per_level = torchvision_anchors((400, 520), [4, 8], [(16,), (32,)], (1.0,))
    assert num_per_level[0] >= atss._WINDOW_MIN_ANCHORS > num_per_level[1]

    def sparse(anchors: Tensor) -> list[bool]:
        found = atss._find_grids(anchors[None], num_per_level)
        return [atss._sparse(anchors[None], g, 100).sparse for g in found]

    assert sparse(anchors) == [True, False]
    assert not atss._sparse(
        anchors[None], atss._find_grids(anchors[None], num_per_level)[0], 1
    ).sparse
    level = anchors[: num_per_level[0]].view(100, 130, 4)
    flipped = level.flip(1).reshape(-1, 4)  # columns right to left: a grid, not sorted
    thin = level.clone()
    thin[:, 7, 2] = thin[:, 7, 0]  # a column of zero width
    huge = level.clone()
    huge[:, -1, 2] = 3e19
    for other in (flipped, thin.reshape(-1, 4), huge.reshape(-1, 4)):
        assert sparse(torch.cat([other, anchors[num_per_level[0] :]])) == [False, False]
    assert sparse(anchors.double()) == [False, False]
    # Ground truths so large that their areas overflow take the matrix.
    grid = atss._sparse(anchors[None], atss._find_grids(anchors[None], num_per_level)[0], 100)
    corners = anchors[None].mT
    assert atss._windows(grid, torch.tensor([[[0.0, 5.0, 40.0, 60.0]]]), corners) is not None
    huge_gt = torch.tensor([[[-3e38, 5.0, 3e38, 5.0]]])  # width inf, height 0: area NaN
    assert atss._windows(grid, huge_gt, corners) is None


@pytest.mark.parametrize("bad", [[-3e38, 5.0, 3e38, 5.0], [0.0, 0.0, 3e38, 3e38]])
def test_a_ground_truth_whose_area_overflows_is_a_value_error(bad: list[float]) -> None:
    # Finite coordinates whose width or area overflows float32: the first made ATSS fail with an
    # index error (its area 6e38 * 0 is NaN), the second gave every anchor an IoU of 0.
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 20.0], [0.0, 0.0, 30.0, 30.0]])
    with pytest.raises(ValueError, match=r"gt_boxes\[0\]: coordinates up to 3e\+38, beyond"):
        assign_atss([anchors], [torch.tensor([bad])], [torch.tensor([1])], num_per_level=[3])
