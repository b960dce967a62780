"""PISA's ranks and weights on hand-made cases (MMDetection, the reference, needs mmcv's compiled
ops and is not installable here): NMS-match groups, Score-HLR and ISR-N's weights, IoU-HLR and
ISR-P's weights, CARL's weights; and the sampler's switches."""

from __future__ import annotations

import math

import pytest
import torch

from hardmine.sample import (
    PISALoss,
    PISASampler,
    RandomSampler,
    carl_weights,
    isr_p_weights,
    nms_match,
    sample_pisa,
)
from hardmine.sample.pisa import score_hlr
from hardmine.structures import Assignment, RoIScores

# --- NMS-match ------------------------------------------------------------------------------


def _one_segment(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.int64)


def test_nms_match_suppresses_at_the_threshold_itself() -> None:
    """mmcv suppresses at IoU >= thr: [0,0,10,5] covers half of [0,0,10,10], IoU exactly 0.5."""
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 5]])
    leader, rank = nms_match(boxes, torch.tensor([0.9, 0.8]), _one_segment(2), 1, 0.5)
    assert leader.tolist() == [0, 0] and rank.tolist() == [0, 1]
    leader, rank = nms_match(boxes, torch.tensor([0.9, 0.8]), _one_segment(2), 1, 0.51)
    assert leader.tolist() == [0, 1] and rank.tolist() == [0, 0]


def test_nms_match_is_greedy_a_suppressed_box_suppresses_nothing() -> None:
    """A (0.9) suppresses B (0.8, IoU 0.6); C (0.7) overlaps B by 0.6 but A by 0.25 only: C is
    not suppressed (B was), and leads a group of its own."""
    boxes = torch.tensor([[0.0, 0, 10, 10], [4, 0, 14, 10], [8, 0, 18, 10]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    leader, rank = nms_match(boxes, scores, _one_segment(3), 1, 0.4)
    assert leader.tolist() == [0, 0, 2] and rank.tolist() == [0, 1, 0]


def test_nms_match_a_box_joins_the_higher_scoring_of_two_kept_boxes_and_ranks_by_score() -> None:
    """Two kept boxes apart (0.6, 0.9, given in that order) and three boxes each overlapping both
    by IoU 0.2: all three join the 0.9 box's group, in score order."""
    boxes = torch.tensor(
        [
            [20.0, 0, 30, 10],  # kept, 0.6
            [0, 0, 10, 10],  # kept, 0.9
            [5, 0, 25, 10],  # 0.3: overlaps each by 50 / 250 = 0.2
            [5, 0, 25, 10],  # 0.5
            [5, 0, 25, 10],  # 0.4
        ]
    )
    scores = torch.tensor([0.6, 0.9, 0.3, 0.5, 0.4])
    leader, rank = nms_match(boxes, scores, _one_segment(5), 1, 0.15)
    assert leader.tolist() == [0, 1, 1, 1, 1]
    assert rank.tolist() == [0, 0, 3, 1, 2]


def test_nms_match_ties_go_to_the_lower_index_and_segments_stay_apart() -> None:
    box = [0.0, 0, 10, 10]
    boxes = torch.tensor([box, box, box, box, [50, 50, 60, 60]])
    scores = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.1])
    segment = torch.tensor([0, 0, 1, -1, 1])  # the fourth takes no part
    leader, rank = nms_match(boxes, scores, segment, 2, 0.5)
    assert leader.tolist() == [0, 0, 2, -1, 4]
    assert rank.tolist() == [0, 1, 0, -1, 0]


def test_nms_match_zero_area_boxes_group_with_nothing() -> None:
    boxes = torch.tensor([[5.0, 5, 5, 5], [5, 5, 5, 5]])
    leader, rank = nms_match(boxes, torch.tensor([0.9, 0.8]), _one_segment(2), 1, 0.5)
    assert leader.tolist() == [0, 1] and rank.tolist() == [0, 0]


# --- Score-HLR and ISR-N --------------------------------------------------------------------

# One image: a positive (index 0), then six valid negatives in three groups of predicted boxes,
# A = {a1 0.9, a2 0.6, a3 0.3}, B = {b1 0.8, b2 0.7}, C = {c1 0.5}, given in a shuffled order,
# then three invalid negatives (scores 0.05, which is not above the threshold, 0.02, 0.01).
A_BOX, B_BOX, C_BOX = [0.0, 0, 10, 10], [40.0, 0, 50, 10], [80.0, 0, 90, 10]
#          pos    a2     b1     c1     a1     a3     b2     inv    inv    inv
NAMES = ["p", "a2", "b1", "c1", "a1", "a3", "b2", "i1", "i2", "i3"]
SCORES = [0.99, 0.6, 0.8, 0.5, 0.9, 0.3, 0.7, 0.05, 0.02, 0.01]
BOXES = [A_BOX, A_BOX, B_BOX, C_BOX, A_BOX, A_BOX, B_BOX, [0, 50, 9, 59], [40, 50, 49, 59], C_BOX]
CLS_LOSS = [0.1, 1.0, 2.0, 0.5, 1.0, 3.0, 1.5, 0.2, 0.3, 0.4]
# Score-HLR: the group tops by score (a1, b1, c1), then the second ranks (b2, a2), then a3.
HLR = {"a1": 0, "b1": 1, "c1": 2, "b2": 3, "a2": 4, "a3": 5}


def _case(scores=SCORES, boxes=BOXES, cls_loss=CLS_LOSS) -> tuple[Assignment, RoIScores]:
    n = len(scores)
    label = torch.tensor([1] + [0] * (n - 1), dtype=torch.int8)
    assignment = Assignment(label, torch.zeros(n).long(), torch.zeros(n), label.long())
    loss = torch.tensor(cls_loss)
    box = torch.tensor(boxes, dtype=torch.float32)
    return assignment, RoIScores(loss, loss, torch.tensor(scores), torch.ones(n).long(), box)


def test_score_hlr_ranks_group_tops_first() -> None:
    a, s = _case()
    hlr = score_hlr(s.box, s.score, torch.zeros(10).long(), 1, (s.score > 0.05) & a.negative, 0.5)
    assert hlr.tolist() == [-1, *(HLR[n] for n in NAMES[1:7]), -1, -1, -1]


def _weights(picked: dict[str, float], k: float = 0.5, bias: float = 0.0) -> dict[str, float]:
    """``(bias + (1 - bias) w) ** k``, then scaled so the weighted losses sum as the plain ones."""
    w = {n: (bias + (1 - bias) * v) ** k for n, v in picked.items()}
    loss = dict(zip(NAMES, CLS_LOSS, strict=True))
    ratio = sum(loss[n] for n in w) / sum(loss[n] * v for n, v in w.items())
    return {n: v * ratio for n, v in w.items()}


def _picked(selection) -> dict[str, float]:
    return {
        n: w
        for n, m, w in zip(NAMES, selection.mask.tolist(), selection.weight.tolist(), strict=True)
        if m
    }


def test_isr_n_picks_the_lowest_hlr_with_linear_then_square_root_weights() -> None:
    """num 5, pos_fraction 0.25: one positive, four negatives expected; six valid, so up = 6 and
    the picks a1, b1, c1, b2 weigh 6/6, 5/6, 4/6, 3/6 before the mapping."""
    a, s = _case()
    (sel,) = sample_pisa([a], [s], num=5, pos_fraction=0.25)
    got = _picked(sel)
    assert got.pop("p") == 1.0
    want = _weights({"a1": 6 / 6, "b1": 5 / 6, "c1": 4 / 6, "b2": 3 / 6})
    assert got == pytest.approx(want, rel=1e-6)
    # The normalisation: the weighted classification loss of the negatives is the plain one.
    loss = dict(zip(NAMES, CLS_LOSS, strict=True))
    assert sum(loss[n] * w for n, w in got.items()) == pytest.approx(
        loss["a1"] + loss["b1"] + loss["c1"] + loss["b2"]
    )


def test_isr_n_tops_up_from_the_invalid_ones_with_the_smallest_weight() -> None:
    """num 10: nine negatives expected, six valid (up = max(9, 6) = 9), so all three invalid ones
    are drawn too, each with the smallest HLR weight, (9 - 5) / 9."""
    a, s = _case()
    (sel,) = sample_pisa([a], [s], num=10, pos_fraction=0.25)
    got = _picked(sel)
    assert got.pop("p") == 1.0
    linear = {n: (9 - h) / 9 for n, h in HLR.items()} | dict.fromkeys(("i1", "i2", "i3"), 4 / 9)
    assert got == pytest.approx(_weights(linear), rel=1e-6)


def test_isr_n_top_up_is_a_uniform_draw() -> None:
    """num 9: eight negatives expected, six valid: two of the three invalid ones, at random."""
    a, s = _case()
    seen = set()
    for seed in range(30):
        (sel,) = sample_pisa([a], [s], num=9, generator=torch.Generator().manual_seed(seed))
        got = _picked(sel)
        assert set(HLR) <= set(got) and len(got) == 9
        drawn = tuple(sorted(set(got) - set(HLR) - {"p"}))
        assert len(drawn) == 2
        seen.add(drawn)
        assert got[drawn[0]] == got[drawn[1]] == min(got[n] for n in HLR)
    assert seen == {("i1", "i2"), ("i1", "i3"), ("i2", "i3")}


def test_isr_n_bias_and_power() -> None:
    a, s = _case()
    (sel,) = sample_pisa([a], [s], num=5, pos_fraction=0.25, k=2.0, bias=0.5)
    got = _picked(sel)
    got.pop("p")
    want = _weights({"a1": 6 / 6, "b1": 5 / 6, "c1": 4 / 6, "b2": 3 / 6}, k=2.0, bias=0.5)
    assert got == pytest.approx(want, rel=1e-6)


def test_isr_n_without_valid_negatives_draws_uniformly_with_weight_one() -> None:
    a, s = _case(scores=[0.99] + [0.01] * 9)
    (sel,) = sample_pisa([a], [s], num=5, pos_fraction=0.25)
    got = _picked(sel)
    assert len(got) == 5 and set(got.values()) == {1.0}


def test_isr_n_equal_scores_rank_by_index() -> None:
    """Three groups' tops with the same score: their HLR follows the index."""
    scores = [0.99, 0.7, 0.7, 0.7, 0.01]
    boxes = [A_BOX, A_BOX, B_BOX, C_BOX, A_BOX]
    a, s = _case(scores=scores, boxes=boxes, cls_loss=[1.0] * 5)
    valid = (s.score > 0.05) & a.negative
    assert score_hlr(s.box, s.score, torch.zeros(5).long(), 1, valid, 0.5).tolist() == [
        -1,
        0,
        1,
        2,
        -1,
    ]


def test_isr_n_images_are_ranked_apart() -> None:
    """The same image twice in a batch gets the same picks and weights as alone."""
    a, s = _case()
    (alone,) = sample_pisa([a], [s], num=5)
    both = sample_pisa([a, a], [s, s], num=5)
    for sel in both:
        assert torch.equal(sel.mask, alone.mask)
        assert torch.allclose(sel.weight, alone.weight)


def test_ignored_candidates_are_never_picked_and_positives_are_capped() -> None:
    a, s = _case()
    label = a.label.clone()
    label[4] = -1  # a1 ignored: b1 now tops the ranking
    ignored = Assignment(label, a.gt_index, a.max_iou, a.gt_class)
    (sel,) = sample_pisa([ignored], [s], num=4, pos_fraction=0.25)
    got = _picked(sel)
    assert "a1" not in got and set(got) == {"p", "b1", "c1", "a2"}  # a2 now leads group A


# --- ISR-P ----------------------------------------------------------------------------------


def test_isr_p_ranks_within_ground_truths_then_within_classes() -> None:
    """Class 1: ground truth 0 with IoUs 0.9, 0.6; ground truth 1 with 0.8, 0.7, 0.5. Class 2:
    ground truth 2 with 0.4. Local ranks 0, 1 | 0, 1, 2 | 0; class 1's IoU-HLR: the local tops
    0.9, 0.8 (HLR 0, 1), then the seconds 0.7, 0.6 (2, 3), then 0.5 (4); class 2's 0.4: 0.
    n_max = 5 (class 1), so the weights are ((5 - HLR) / 5) ** 2."""
    iou = torch.tensor([0.9, 0.6, 0.8, 0.7, 0.5, 0.4])
    gt = torch.tensor([0, 0, 1, 1, 1, 2])
    label = torch.tensor([1, 1, 1, 1, 1, 2])
    hlr = [0, 3, 1, 2, 4, 0]
    raw = [((5 - h) / 5) ** 2 for h in hlr]  # 1, 0.16, 0.64, 0.36, 0.04, 1
    w = isr_p_weights(iou, torch.zeros(6).long(), gt, label, torch.ones(6))
    assert w.tolist() == pytest.approx([r * 6 / sum(raw) for r in raw])  # sum(raw) = 3.2


def test_isr_p_keeps_the_ground_truths_of_different_images_apart() -> None:
    """Ground truth 0 of image 0 (IoUs 0.9, 0.8) and ground truth 0 of image 1 (0.7), one class:
    HLR 0, 2, 1 (the 0.7 is its own ground truth's best). Merged, 0.7 would rank last."""
    iou = torch.tensor([0.9, 0.8, 0.7])
    raw = [((3 - h) / 3) ** 2 for h in (0, 2, 1)]
    loss = torch.tensor([1.0, 2.0, 4.0])
    w = isr_p_weights(
        iou, torch.tensor([0, 0, 1]), torch.zeros(3).long(), torch.ones(3).long(), loss
    )
    ratio = 7.0 / (raw[0] * 1 + raw[1] * 2 + raw[2] * 4)
    assert w.tolist() == pytest.approx([r * ratio for r in raw])
    assert float((w * loss).sum()) == pytest.approx(7.0)


def test_isr_p_local_rank_comes_before_iou() -> None:
    """The paper's lexicographic order where MMDetection's sum IoU + (n_max - local rank) ties:
    an IoU of 0 at local rank 0 (its ground truth's only positive) against 1.0 at local rank 1."""
    iou = torch.tensor([0.0, 1.0, 1.0])
    gt = torch.tensor([0, 1, 1])
    w = isr_p_weights(iou, torch.zeros(3).long(), gt, torch.ones(3).long(), torch.ones(3), k=1.0)
    # HLR: the two local tops (1.0 of gt 1 first, then 0.0 of gt 0), then gt 1's second 1.0.
    raw = [2 / 3, 3 / 3, 1 / 3]
    assert w.tolist() == pytest.approx([r * 3 / 2 for r in raw])


def test_isr_p_bias_power_and_starting_weights() -> None:
    iou = torch.tensor([0.9, 0.5])
    base = torch.tensor([1.0, 0.5])
    loss = torch.tensor([2.0, 1.0])
    w = isr_p_weights(
        iou, torch.zeros(2).long(), torch.zeros(2).long(), torch.ones(2).long(), loss, base,
        k=3.0, bias=0.5,
    )  # fmt: skip
    raw = [(0.5 + 0.5 * 1.0 * 1.0) ** 3, (0.5 + 0.5 * 0.5 * 0.5) ** 3]
    ratio = (2.0 * 1.0 + 1.0 * 0.5) / (2.0 * raw[0] + 1.0 * raw[1])
    assert w.tolist() == pytest.approx([r * ratio for r in raw])


def test_isr_p_equal_ious_rank_by_index_and_no_positives() -> None:
    w = isr_p_weights(
        torch.full((3,), 0.5), torch.zeros(3).long(), torch.zeros(3).long(),
        torch.ones(3).long(), torch.ones(3), k=1.0,
    )  # fmt: skip
    assert w.tolist() == pytest.approx([x * 3 / 2 for x in (1, 2 / 3, 1 / 3)])
    empty = torch.zeros(0)
    assert isr_p_weights(empty, empty.long(), empty.long(), empty.long(), empty).numel() == 0


# --- CARL -----------------------------------------------------------------------------------


def test_carl_weights_and_their_gradient() -> None:
    """(0.2 + 0.8 p) for p = 0.5, 1, 0: 0.6, 1, 0.2, scaled to sum to 3 (by 3 / 1.8)."""
    prob = torch.tensor([0.5, 1.0, 0.0], requires_grad=True)
    w = carl_weights(prob)
    assert w.tolist() == pytest.approx([1.0, 5 / 3, 1 / 3])
    (w * torch.tensor([1.0, 0.0, 0.0])).sum().backward()
    # d/dp0 of 3 (0.2 + 0.8 p0) / S, S = sum of the three: 3 * 0.8 * (S - 0.6) / S**2.
    s = 1.8
    assert prob.grad[0].item() == pytest.approx(3 * 0.8 * (s - 0.6) / s**2)
    assert prob.grad[1].item() == pytest.approx(-3 * 0.8 * 0.6 / s**2)


def test_carl_power() -> None:
    w = carl_weights(torch.tensor([1.0, 0.5]), k=2.0, bias=0.0)
    assert w.tolist() == pytest.approx([2 * 1 / 1.25, 2 * 0.25 / 1.25])


# --- the sampler ----------------------------------------------------------------------------


def test_switches() -> None:
    assert PISASampler().needs_scores and PISASampler().pisa_loss == PISALoss()
    assert not PISASampler(isr_n=False).needs_scores
    assert PISASampler(isr_p=False, carl=False).pisa_loss is None
    assert PISASampler(carl=False).pisa_loss == PISALoss(carl=False)
    with pytest.raises(ValueError, match="scores"):
        PISASampler()([torch.zeros(1, 4)], [Assignment.empty(1)])


def test_without_isr_n_it_draws_as_random_sampling() -> None:
    a, _ = _case()
    for seed in range(3):
        got = PISASampler(num=6, isr_n=False)([torch.zeros(10, 4)], [a], generator=_gen(seed))
        want = RandomSampler(num=6)([torch.zeros(10, 4)], [a], generator=_gen(seed))
        assert torch.equal(got[0].mask, want[0].mask) and torch.equal(got[0].weight, want[0].weight)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_weights_are_finite_with_zero_losses() -> None:
    a, s = _case(cls_loss=[0.0] * 10)
    (sel,) = sample_pisa([a], [s], num=5)
    assert all(math.isfinite(w) for w in sel.weight.tolist())


@pytest.mark.parametrize("name", ["random", "ohem", "iou_balanced", "overlap", "pisa", "mined"])
def test_misuse_is_refused_naming_the_argument(name: str) -> None:
    """S15 D11: two images of boxes and one assignment gave one Selection silently; a generator
    that is not one surfaced torch's own argument error."""
    from hardmine.sample import SAMPLERS, MinedNegativeSampler

    a, s = _case()
    sampler = (
        MinedNegativeSampler(RandomSampler(num=4)) if name == "mined" else SAMPLERS[name](num=4)
    )
    scores = {"scores": [s]} if name in ("pisa", "mined") else {}
    with pytest.raises(ValueError, match="boxes has 2 images and assignments 1"):
        sampler([s.box, s.box], [a], losses=[s.loss], **scores)
    with pytest.raises(TypeError, match=r"generator must be a torch\.Generator or None, got int"):
        sampler([s.box], [a], losses=[s.loss], generator=0, **scores)


def test_pisa_scores_must_be_roi_scores() -> None:
    a, s = _case()
    with pytest.raises(TypeError, match=r"scores must be a sequence of RoIScores.*got Tensor"):
        PISASampler(num=4)([s.box], [a], scores=torch.ones(10))
    with pytest.raises(TypeError, match="got a list of Tensor"):
        sample_pisa([a], [torch.ones(10)], num=4)


def test_the_powers_are_at_most_ten() -> None:
    """S15 D8: carl_k 60 made CARL's normalisation 0 / 0 (a non-finite gradient at step 1)."""
    for key in ("isr_n_k", "isr_p_k", "carl_k"):
        PISASampler(**{key: 10.0})
        with pytest.raises(ValueError, match=rf"{key} must be a finite number in \[0, 10\]"):
            PISASampler(**{key: 60.0})
    with pytest.raises(ValueError, match="carl_k must be a finite number in"):
        carl_weights(torch.tensor([0.5]), k=1e30)
