"""The Overlap Sampler: IoU(p,n) / IoU(p,e), the four strategies, ε, batching, memory."""

from __future__ import annotations

import time

import pytest
import torch

import hardmine.sample.overlap as overlap_module
from hardmine.boxes import box_area, box_iou, upcast
from hardmine.sample import OverlapSampler, overlap_with_positives, sample_overlap
from hardmine.sample.overlap import (
    _best_matched,
    _dense_overlaps,
    _overlap_key,
    _overlaps,
    _sparse_overlaps,
)
from hardmine.sample.quota import flatten, segment_by_key, take_top_in_segments
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_overlaps_equal_the_dense_ones_to_the_bit(dtype: torch.dtype) -> None:
    """Positives in clusters of several ground truths (the CPU's grouped path), with copies left
    out of IoU(p,e), zero-area and outside boxes, an image without positives and an empty one."""
    gen = torch.Generator().manual_seed(1)
    boxes, flags, gt_index = [], [], []
    for n, num_gt in [(300, 6), (120, 0), (0, 0), (250, 3)]:
        centres = torch.rand(max(num_gt, 1), 2, generator=gen) * 400
        owner = torch.randint(max(num_gt, 1), (n,), generator=gen)
        xy = centres[owner] + torch.randn(n, 2, generator=gen) * 30 - 20
        b = torch.cat([xy, xy + torch.rand(n, 2, generator=gen) * 60 + 5], 1)
        b[:4, 2:] = b[:4, :2]  # zero-area
        label = torch.zeros(n, dtype=torch.int8)
        if num_gt:
            label[torch.rand(n, generator=gen) < 0.3] = 1
        boxes.append(b.to(dtype))
        gt_index.append(owner if num_gt else torch.zeros(n, dtype=torch.long))
        flags.append(label)
    label = torch.cat(flags)
    flat = flatten(
        [
            Assignment(lab, g, torch.zeros(lab.shape[0]), lab.long())
            for lab, g in zip(flags, gt_index, strict=True)
        ]
    )
    cat = torch.cat(boxes)
    positive = label == 1
    examples = torch.rand(cat.shape[0], generator=gen) > 0.05  # some copies
    planes = torch.cat([cat, box_area(cat)[:, None]], 1)
    p_max = int(flat.count(positive).max())
    for with_pe, ex, budget in [(True, examples, 1 << 18), (True, None, 3000), (False, None, 500)]:
        sparse = _sparse_overlaps(planes, flat, positive, with_pe, ex, budget, p_max)
        assert sparse is not None  # the grouped path, not its dense fallback
        dense = _dense_overlaps(
            planes, flat, positive, flat.count(positive), p_max, with_pe, ex, budget
        )
        assert torch.equal(sparse[0], dense[0]) and torch.equal(sparse[1], dense[1])
        want = box_iou(cat, cat[positive])  # the definition, on the one image at a time
        same_image = flat.image[:, None] == flat.image[positive][None]
        torch.testing.assert_close(sparse[0], torch.where(same_image, want, 0).amax(1))


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_best_matched_on_the_cpu_picks_what_the_sorted_segments_pick(dtype) -> None:
    """The CPU's scatters of ε's best-matched picks against the sorts of every other device: one
    per (image, ground truth), the largest max IoU, ties (many, on a coarse grid) to the lower
    index; negative ground-truth indices, an image with nothing matched, an empty one: 2 x 8."""
    gen = torch.Generator().manual_seed(0)
    sizes = [300, 0, 40, 200]
    assignments = []
    for n in sizes:
        gt = torch.randint(-1, 7, (n,), generator=gen)
        iou = (torch.randint(0, 5, (n,), generator=gen) / 4).to(dtype)
        assignments.append(Assignment(torch.ones(n, dtype=torch.int8), gt, iou, gt))
    flat = flatten(assignments)
    matched = torch.rand(flat.total, generator=gen) < 0.5
    matched[300:340] = False  # the third image: nothing matched
    keys = torch.where(matched, flat.max_iou, float("-inf"))
    per_gt = segment_by_key(flat.image, flat.gt_index, matched)
    want = take_top_in_segments(keys, per_gt, torch.ones_like(per_gt))
    assert torch.equal(_best_matched(flat, matched), want) and int(want.sum()) == 16
    assert not _best_matched(flat, torch.zeros_like(matched)).any()


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


def test_defaults_are_the_papers_best_setting():
    """Table 2(f), last column: soft negatives with K = 2, soft positives, ε = 2; the text's
    readings of every open choice."""
    s = OverlapSampler()
    assert (s.strategy, s.pos_strategy, s.num_bins, s.epsilon) == ("soft", "soft", 2, 2.0)
    assert (s.upper, s.hard_thr, s.bins, s.linear_top_up) == (0.7, 0.5, "fixed", False)
    assert (s.epsilon_on, s.gt_copies_in_pe) == ("best_proposal", False)
    assert s.gt_copies_in_pn is True


def _copy_scene():
    """Two ground truths, their copies appended (5, 6). Positive 0 overlaps only its ground truth
    (IoU 0.6) and negative 2 (IoU 0.05); positive 1 (IoU 0.82 with its ground truth) overlaps
    negative 3 by 0.5; negative 4 is far from everything."""
    gts = torch.tensor([POSITIVE_BOX, [500.0, 0.0, 600.0, 100.0]])
    boxes = torch.tensor(
        [
            [25.0, 0.0, 125.0, 100.0],
            [500.0, 10.0, 600.0, 110.0],
            [115.0, 0.0, 215.0, 100.0],
            [500.0, 10 + 100 / 3, 600.0, 110 + 100 / 3],
            [300.0, 300.0, 330.0, 330.0],
        ]
    )
    boxes = torch.cat([boxes, gts])
    best, index = box_iou(gts, boxes).max(0)
    label = torch.where(best >= 0.5, 1, 0).to(torch.int8)
    assert label.tolist() == [1, 1, 0, 0, 0, 1, 1]
    return boxes, Assignment(label, index, best, label.long())


def test_iou_pe_leaves_the_ground_truth_copies_out():
    boxes, a = _copy_scene()
    flat = flatten([a])
    pos = flat.label == 1
    copy = pos & (flat.max_iou >= 1)
    assert copy.tolist() == [False] * 5 + [True, True]
    _, with_copies = overlap_with_positives(boxes, flat, pos)
    _, without = overlap_with_positives(boxes, flat, pos, examples=~copy)
    assert with_copies[0] == pytest.approx(0.6) and with_copies[1] == pytest.approx(9 / 11)
    assert without[0] == pytest.approx(10 / 190, abs=1e-4) and without[1] == pytest.approx(0.5)
    # A copy's own IoU(p,e): its largest with another proposal, its positive.
    assert without[5] == pytest.approx(0.6) and without[6] == pytest.approx(9 / 11)


def test_positive_sampling_sees_the_overlap_among_examples():
    """One positive pick among the two proposals by hard sampling (θ 0.5): by default only
    positive 1 overlaps another example by >= θ; counting the copy, both do."""
    boxes, a = _copy_scene()
    a = Assignment(a.label.clone(), a.gt_index, a.max_iou, a.gt_class)
    a.label[5:] = -1  # the copies ignored (still copies: IoU 1), so the one pick is a proposal
    picks = {True: 0, False: 0}
    for gt_copies_in_pe in (False, True):
        for seed in range(100):
            gen = torch.Generator().manual_seed(seed)
            (s,) = sample_overlap(
                [boxes], [a], num=2, pos_fraction=0.5, pos_strategy="hard",
                gt_copies_in_pe=gt_copies_in_pe, generator=gen,
            )  # fmt: skip
            picks[gt_copies_in_pe] += int(s.mask[0])
    assert picks[False] == 0  # never the isolated positive
    assert 30 < picks[True] < 70  # IoU(p,e) 0.6 with the copy: a hard one too


def test_epsilon_goes_to_the_best_proposal_not_the_copy():
    boxes, a = _copy_scene()
    (s,) = sample_overlap([boxes], [a], num=7, pos_fraction=0.6)
    assert s.mask.all()
    assert s.weight.tolist() == [2.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # each one's proposal
    (s,) = sample_overlap([boxes], [a], num=7, pos_fraction=0.6, epsilon_on="any_positive")
    assert s.weight.tolist() == [1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0]  # the copies: IoU 1
    # Without a picked proposal of its ground truth, no ε at all (never the copy).
    label = a.label.clone()
    label[1] = -1
    (s,) = sample_overlap(
        [boxes], [Assignment(label, a.gt_index, a.max_iou, a.gt_class)], num=7, pos_fraction=0.6
    )
    assert s.mask[6] and s.weight.tolist() == [2.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]


def test_epsilon_on_many_ground_truths_never_lands_on_a_copy():
    gen = torch.Generator().manual_seed(0)
    gts = torch.rand(8, 2, generator=gen) * 400
    gts = torch.cat([gts, gts + 30 + torch.rand(8, 2, generator=gen) * 100], 1)
    jitter = gts.repeat(10, 1) + torch.randn(80, 4, generator=gen) * 8
    boxes = torch.cat([jitter, torch.rand(200, 4, generator=gen).sort(1).values * 500, gts])
    best, index = box_iou(gts, boxes).max(0)
    label = torch.where(best >= 0.5, 1, 0).to(torch.int8)
    a = Assignment(label, index, best, label.long())
    for epsilon_on, on_copies in (("best_proposal", 0), ("any_positive", 8)):
        (s,) = sample_overlap([boxes], [a], epsilon_on=epsilon_on, generator=gen)
        heavy = torch.nonzero(s.weight == 2).flatten()
        assert len(heavy) == 8  # one per ground truth
        assert int((heavy >= 280).sum()) == on_copies
        for i in heavy.tolist():  # the best-matched picked positive of its ground truth
            same = s.mask & (a.gt_index == a.gt_index[i]) & (a.label == 1)
            if epsilon_on == "best_proposal":
                same[280:] = False
            assert a.max_iou[i] == a.max_iou[same].max()


def _authors_ovsampler(iou_n2p: torch.Tensor, num_neg: int, gen: torch.Generator) -> torch.Tensor:
    """The negative draw of the authors' ``OvSampler`` (ChenJoya/sampling-free), transcribed."""
    iou_split = 0.5 * (iou_n2p.min() + iou_n2p.max())
    probs = torch.zeros_like(iou_n2p)
    mask = iou_n2p <= iou_split
    numel_neg, numel_mask = iou_n2p.numel(), int(mask.sum())
    probs[mask] = 1 / max(numel_mask, 1)
    probs[~mask] = 1 / max(numel_neg - numel_mask, 1)
    return probs.multinomial(num_neg, generator=gen)


def test_observed_bins_draw_as_the_authors_ovsampler():
    # IoU(p,n) from 0.1 to 0.5: the observed midpoint (about 0.3) splits the low 20 or 24 from
    # the high 10 or 6; 8 negatives drawn.
    ious = [0.1] * 12 + [0.2] * 8 + [0.3] * 4 + [0.45] * 3 + [0.5] * 3
    boxes, a = _scene(ious)
    trials = 3000
    gen = torch.Generator().manual_seed(0)
    sels = sample_overlap(
        [boxes] * trials, [a] * trials, num=9, pos_fraction=1 / 9, strategy="soft",
        bins="observed", generator=gen,
    )  # fmt: skip
    ours = torch.stack([s.mask[1:] for s in sels]).float().mean(0)  # [30]
    iou_n2p = box_iou(boxes[:1], boxes[1:])[0]
    theirs = torch.zeros(30)
    for _ in range(trials):
        theirs[_authors_ovsampler(iou_n2p, 8, gen)] += 1
    theirs /= trials
    torch.testing.assert_close(ours, theirs, atol=0.04, rtol=0)
    assert ours[24:].mean() > 0.5 and ours[:20].mean() < 0.2  # the high bin is favoured


def test_observed_bins_put_the_midpoint_in_the_lower_bin():
    """Exact IoUs 0, 0.25 (twenty) and 0.5 with the positive: the midpoint 0.25 is low, as the
    authors' "iou <= split". So the bins are {0, twenty 0.25} and {0.5}: two draws take the 0.5
    one with probability 1/2 + 1/2 * 21/41, the far one rarely."""
    boxes = torch.tensor(
        [POSITIVE_BOX, [300.0, 300.0, 310.0, 310.0]]
        + [[0.0, 0.0, 100.0, 25.0]] * 20
        + [[0.0, 0.0, 100.0, 50.0]]
    )
    label = torch.tensor([1] + [0] * 22, dtype=torch.int8)
    ious = box_iou(boxes[:1], boxes)[0]
    assert ious[1:].unique().tolist() == [0.0, 0.25, 0.5]
    a = Assignment(label, torch.zeros(23, dtype=torch.long), ious, label.long())
    gen = torch.Generator().manual_seed(0)
    sels = sample_overlap(
        [boxes] * 2000, [a] * 2000, num=3, pos_fraction=1 / 3, bins="observed", generator=gen
    )
    freq = torch.stack([s.mask for s in sels]).float().mean(0)
    assert float(freq[22]) == pytest.approx(0.5 + 0.5 * 21 / 41, abs=0.03)
    assert float(freq[1]) < 0.1


def test_fixed_and_observed_bins_differ_where_the_range_is_narrow():
    """IoU(p,n) all below 0.35: one fixed bin holds them all (uniform); observed bins split
    them at their own midpoint."""
    ious = [0.05] * 40 + [0.3] * 4
    boxes, a = _scene(ious)
    counts = {}
    for bins in ("fixed", "observed"):
        gen = torch.Generator().manual_seed(0)
        sels = sample_overlap(
            [boxes] * 500, [a] * 500, num=9, pos_fraction=1 / 9, bins=bins, generator=gen
        )
        counts[bins] = torch.stack([s.mask[41:] for s in sels]).float().sum(1).mean()
    assert counts["fixed"] == pytest.approx(8 * 4 / 44, abs=0.15)  # uniform over 44
    assert counts["observed"] > 2.5  # the 4 high ones weigh as much as the 40 low ones


def test_linear_never_tops_up_with_zero_overlap_by_default():
    ious = [0.0] * 20 + [0.2, 0.4, 0.6]
    boxes, a = _scene(ious)
    gen = torch.Generator().manual_seed(0)
    (s,) = sample_overlap([boxes], [a], num=9, pos_fraction=1 / 9, strategy="linear",
                          generator=gen)  # fmt: skip
    assert s.mask[21:].all() and not s.mask[1:21].any()  # 3 negatives, not the quota of 8
    (s,) = sample_overlap([boxes], [a], num=9, pos_fraction=1 / 9, strategy="linear",
                          linear_top_up=True, generator=gen)  # fmt: skip
    assert s.mask[21:].all() and int(s.mask[1:21].sum()) == 5


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("num", 0),
        ("pos_fraction", 1.5),
        ("strategy", "bogus"),
        ("pos_strategy", "bogus"),
        ("num_bins", 0),
        ("hard_thr", -0.1),
        ("upper", 0.0),
        ("bins", "adaptive"),
        ("epsilon", 0.0),
        ("epsilon_on", "copy"),
    ],
)
def test_bad_settings_name_the_setting(setting, value):
    with pytest.raises(ValueError, match=setting):
        OverlapSampler(**{setting: value})
    boxes, a = _scene([0.1])
    with pytest.raises(ValueError, match=setting):
        sample_overlap([boxes], [a], **{setting: value})


@pytest.mark.parametrize("strategy", ["uniform", "hard", "soft", "linear"])
def test_an_image_without_positives_draws_its_negatives_uniformly(strategy: str) -> None:
    """Defect D2: the docstring says every strategy is uniform without positives (every IoU(p,n)
    is 0); linear drew nothing there (weight 0 for all). Now each strategy fills the quota, and
    over many draws every negative is picked about equally often."""
    n, num = 40, 10
    boxes = torch.rand(n, 2) * 100
    boxes = torch.cat([boxes, boxes + 10], 1)
    assignment = Assignment.empty(n)
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(n)
    trials = 400
    for _ in range(trials):
        (sel,) = sample_overlap([boxes], [assignment], num=num, strategy=strategy, generator=gen)
        assert sel.num_picked == num
        counts += sel.mask.float()
    expected = trials * num / n  # 100 picks per negative
    # Binomial(400, 0.25): standard deviation about 8.7; 5 of them is far beyond chance.
    assert (counts - expected).abs().max() < 5 * (trials * 0.25 * 0.75) ** 0.5


def test_linear_still_skips_zero_overlap_negatives_when_positives_exist() -> None:
    """The paper's reading for an image WITH positives is unchanged: IoU(p,n) = 0 is never drawn."""
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0], [50.0, 50.0, 60.0, 60.0]])
    label = torch.tensor([1, 0, 0], dtype=torch.int8)
    a = Assignment(
        label, torch.zeros(3, dtype=torch.long), torch.tensor([1.0, 0.8, 0.0]), label.long()
    )
    (sel,) = sample_overlap([boxes], [a], num=3, pos_fraction=0.34, strategy="linear")
    assert sel.mask.tolist() == [True, True, False]


def test_iou_pn_without_the_ground_truth_copies_by_name():
    """D3: IoU(p,n) counts the copies by default (the paper's "positives (IoU(g,p) >= 0.5)");
    ``gt_copies_in_pn=False`` counts the positive proposals only."""
    gt = torch.tensor([POSITIVE_BOX])
    proposal = [-30.0, 0.0, 70.0, 100.0]  # IoU 70/130 with the ground truth: positive
    near_gt = [40.0, 0.0, 140.0, 100.0]  # IoU 60/140 with the copy, 30/170 with the proposal
    far = [[300.0 + 20 * i, 300.0, 310.0 + 20 * i, 310.0] for i in range(4)]
    boxes = torch.cat([torch.tensor([proposal, near_gt, *far]), gt])
    best, index = box_iou(gt, boxes).max(0)
    label = torch.where(best >= 0.5, 1, 0).to(torch.int8)
    assert label.tolist() == [1, 0, 0, 0, 0, 0, 1]
    a = Assignment(label, index, best, label.long())
    picks = {True: 0, False: 0}
    for gt_copies_in_pn in (True, False):
        for seed in range(100):
            gen = torch.Generator().manual_seed(seed)
            (s,) = sample_overlap(
                [boxes], [a], num=2, pos_fraction=0.5, strategy="hard", hard_thr=0.35,
                gt_copies_in_pn=gt_copies_in_pn, generator=gen,
            )  # fmt: skip
            assert int(s.mask[1:6].sum()) == 1
            picks[gt_copies_in_pn] += int(s.mask[1])
    assert picks[True] == 100  # IoU(p,n) 0.43 >= θ: always the hard one
    assert 5 < picks[False] < 40  # 0.18 with the proposal: one of five, uniformly


def test_iou_pn_without_copies_is_uniform_where_only_copies_are_positive():
    """With ``gt_copies_in_pn=False`` an image whose only positive is a copy has no IoU(p,n):
    even ``linear`` draws uniformly there, as in an image without positives."""
    gt = torch.tensor([POSITIVE_BOX])
    boxes = torch.cat([torch.tensor([*_shifted([0.3]), [300.0, 300.0, 310.0, 310.0]]), gt])
    best, index = box_iou(gt, boxes).max(0)
    label = torch.where(best >= 0.5, 1, 0).to(torch.int8)
    a = Assignment(label, index, best, label.long())
    far = {True: 0, False: 0}
    for gt_copies_in_pn in (True, False):
        for seed in range(100):
            gen = torch.Generator().manual_seed(seed)
            (s,) = sample_overlap(
                [boxes], [a], num=2, pos_fraction=0.5, strategy="linear",
                gt_copies_in_pn=gt_copies_in_pn, generator=gen,
            )  # fmt: skip
            assert int(s.mask[:2].sum()) == 1
            far[gt_copies_in_pn] += int(s.mask[1])
    assert far[True] == 0  # IoU(p,n) 0 with the copy: linear never picks it
    assert 30 < far[False] < 70


def _crowded_batch(dtype: torch.dtype = torch.float32):
    """Images of proposals crowding around their ground truths, as ``benchmarks/scaling.py``
    draws them, with the cases every path must handle: images with 0, 1 (one leaf), 9 and
    hundreds of positives (trees of several heights), an empty image, zero-area, inverted,
    outside-the-image and duplicated boxes, negatives matched to no ground truth, ignored
    candidates and copies left out of IoU(p,e).
    """
    gen = torch.Generator().manual_seed(3)
    boxes, labels, owners = [], [], []
    for n, num_gt in [(900, 3), (40, 1), (0, 0), (300, 0), (1500, 6), (14, 1), (25, 2)]:
        gt_xy = torch.rand(max(num_gt, 1), 2, generator=gen) * 500 - 50  # some leave the image
        gt = torch.cat([gt_xy, gt_xy + torch.rand(max(num_gt, 1), 2, generator=gen) * 150 + 20], 1)
        owner = torch.randint(max(num_gt, 1), (n,), generator=gen)
        wh = (gt[owner, 2:] - gt[owner, :2]).repeat(1, 2)
        b = gt[owner] + (torch.rand(n, 4, generator=gen) - 0.5) * wh * 0.8
        if n:
            b[:5, 2:] = b[:5, :2]  # zero-area
            b[5:8] = b[5:8, [2, 3, 0, 1]]  # inverted
            b[8:12] = b[12]  # duplicates
        iou = box_iou(gt, b) if num_gt else torch.zeros(1, n)
        label = torch.where(iou.amax(0) >= 0.5, 1, 0).to(torch.int8)
        label[torch.rand(n, generator=gen) < 0.03] = -1
        owner[(label == 0) & (torch.rand(n, generator=gen) < 0.05)] = -1  # matched to none
        boxes.append(b.to(dtype))
        labels.append(label)
        owners.append(owner)
    flat = flatten(
        [
            Assignment(lab, o, torch.zeros(lab.shape[0]), lab.long())
            for lab, o in zip(labels, owners, strict=True)
        ]
    )
    positive = torch.cat(labels) == 1
    examples = torch.rand(positive.shape[0], generator=gen) > 0.05  # some copies
    return torch.cat(boxes), flat, positive, examples


def _force(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """Send the CPU's overlaps down the trees (``"tree"``) or away from them (``"sparse"``)."""
    above = 0 if path == "tree" else 1 << 40
    monkeypatch.setattr(overlap_module, "_TREE_ABOVE", {True: above, False: above})
    monkeypatch.setattr(overlap_module, "_BRUTE_MOST", above)
    monkeypatch.setattr(overlap_module, "_PAIRS_ABOVE", above)
    monkeypatch.setattr(overlap_module, "_KEYED_ABOVE", 0)


def _brute_force(boxes, flat, positive, examples):
    """IoU(p,n) and IoU(p,e) from ``box_iou`` of each image's every pair."""
    iou_pn, iou_pe = [], []
    for b, pos, ex in zip(
        *(t.split(flat.bounds.diff().tolist()) for t in (boxes, positive, examples)), strict=True
    ):
        iou = box_iou(b, b)  # [N, N], float32 for half precision
        iou_pn.append(torch.where(pos[None], iou, 0).amax(1) if b.shape[0] else iou.new_zeros(0))
        others = torch.where(ex[None], iou.fill_diagonal_(0), 0)
        iou_pe.append(torch.where(pos, others.amax(1), 0) if b.shape[0] else iou.new_zeros(0))
    return torch.cat(iou_pn), torch.cat(iou_pe)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_tree_overlaps_equal_box_iou_to_the_bit(monkeypatch, dtype: torch.dtype) -> None:
    boxes, flat, positive, examples = _crowded_batch(dtype)
    everyone = torch.ones_like(examples)
    want = {True: _brute_force(boxes, flat, positive, examples)}
    want[False] = _brute_force(boxes, flat, positive, everyone)
    assert want[True][0].dtype == upcast(boxes).dtype and bool((want[True][0] > 0).any())
    _force(monkeypatch, "tree")
    # A small budget: the pairs are searched a few hundred at a time.
    for with_pe, ex, budget in [(True, examples, 1 << 18), (True, None, 3000), (False, None, 2048)]:
        iou_pn, iou_pe = overlap_with_positives(
            boxes, flat, positive, with_pe=with_pe, examples=ex, budget=budget
        )
        assert torch.equal(iou_pn, want[ex is not None][0])
        assert torch.equal(iou_pe, want[ex is not None][1] if with_pe else torch.zeros_like(iou_pe))


def test_tree_overlaps_of_all_equal_boxes_and_of_no_positives(monkeypatch) -> None:
    _force(monkeypatch, "tree")
    box = torch.tensor([[10.0, 20.0, 110.0, 70.0]])
    boxes = torch.cat([box.repeat(40, 1), box.repeat(5, 1) + 500])
    label = torch.tensor([1] * 30 + [0] * 15, dtype=torch.int8)
    flat = flatten(
        [Assignment(label, torch.zeros(45, dtype=torch.long), torch.zeros(45), label.long())]
    )
    iou_pn, iou_pe = overlap_with_positives(boxes, flat, label == 1)
    assert iou_pn.tolist() == [1.0] * 40 + [0.0] * 5
    assert iou_pe.tolist() == [1.0] * 30 + [0.0] * 15
    iou_pn, iou_pe = overlap_with_positives(boxes, flat, torch.zeros(45, dtype=torch.bool))
    assert not iou_pn.any() and not iou_pe.any()


@pytest.mark.parametrize("path", ["tree", "sparse"])
@pytest.mark.parametrize(
    ("strategy", "num_bins"), [("soft", 2), ("soft", 3), ("soft", 7), ("hard", 2), ("uniform", 2)]
)
def test_keyed_overlaps_keep_the_key_of_the_maximum(monkeypatch, path, strategy, num_bins) -> None:
    """What the sampler reads: the soft bin or the side of θ of each maximum, exactly."""
    boxes, flat, positive, examples = _crowded_batch()
    exact = _brute_force(boxes, flat, positive, examples)
    key = _overlap_key(strategy, bins="fixed", num_bins=num_bins, upper=0.7, hard_thr=0.5)
    _force(monkeypatch, path)
    keyed = _overlaps(boxes, flat, positive, examples=examples, pn_key=key, pe_key=key)
    assert torch.equal(key(keyed[0]), key(exact[0]))
    assert torch.equal(key(keyed[1][positive]), key(exact[1][positive]))
    assert not keyed[1][~positive].any()


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"strategy": "hard", "pos_strategy": "hard"},
        {"num_bins": 3, "pos_strategy": "uniform", "gt_copies_in_pn": False},
        {"strategy": "linear", "pos_strategy": "soft", "bins": "observed"},
    ],
)
def test_trees_pick_what_the_grouped_path_picks(monkeypatch, settings) -> None:
    boxes, flat, positive, examples = _crowded_batch()
    sizes = flat.bounds.diff().tolist()
    per_image = list(boxes.split(sizes))
    gt_index = flat.gt_index.split(sizes)
    label = torch.where(positive, 1, flat.label).split(sizes)
    # Copies (max IoU 1) among the positives, as the model integration appends them.
    max_iou = torch.where(positive & ~examples, 1.0, 0.6).split(sizes)
    assignments = [
        Assignment(lab, g, m, lab.long())
        for lab, g, m in zip(label, gt_index, max_iou, strict=True)
    ]
    picks = {}
    for path in ("sparse", "tree"):
        _force(monkeypatch, path)
        gen = torch.Generator().manual_seed(0)
        sels = sample_overlap(per_image, assignments, num=256, generator=gen, **settings)
        picks[path] = [(s.mask, s.weight) for s in sels]
    for (mask, weight), (tree_mask, tree_weight) in zip(
        picks["sparse"], picks["tree"], strict=True
    ):
        assert torch.equal(mask, tree_mask) and torch.equal(weight, tree_weight)
