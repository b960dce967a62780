"""Prime Sample Attention, PISA (Cao et al., "Prime Sample Attention in Object Detection", CVPR
2020, arXiv 1904.04821): importance-based sample reweighting of the negatives (ISR-N) and of the
positives (ISR-P), and the classification-aware regression loss (CARL).

The paper has no fixed text in ``papers/``; its definitions are taken as MMDetection, the
reference implementation, computes them (``ScoreHLRSampler``, ``isr_p``, ``carl_loss``; the
defaults are those of its PISA configurations), and every point where hardmine's reading differs
is named below. The three parts act at three different moments of a training step, so PISA is
split across the ``Sampler`` protocol and the RoI heads:

1. **ISR-N picks and weights the negatives** before the training pass, from what a read-only
   pass of the box head predicts for every negative: its largest foreground probability and the
   box it predicts for that class. So ``PISASampler`` is a sampler with ``needs_scores``: the RoI
   heads give it one ``hardmine.structures.RoIScores`` per image (``read_only.predict_rois``,
   the pass OHEM uses for its losses), and ``sample_pisa`` returns the usual ``Selection``: the
   positives drawn as random sampling draws them (weight 1), the negatives picked by Score-HLR
   with ISR-N's weights.
2. **ISR-P reweights the positives' classification loss** in the training pass, from the boxes
   the trained head predicts there; **CARL** is an extra loss term on the positives, computed
   from the same pass with its gradient. Neither can be a ``Selection`` weight (ISR-P weighs
   the classification loss only, CARL needs the gradient of the class probability), so the
   sampler states them as a ``PISALoss`` (its ``pisa_loss`` attribute) and
   ``SamplingRoIHeads`` applies them after the picks (``hardmine.models._pisa``), with the pure
   functions here: ``isr_p_weights`` and ``carl_weights``.

Each part is switched on and off by its own setting (``isr_n``, ``isr_p``, ``carl``): with all
three off ``PISASampler`` is ``RandomSampler`` (the same picks from the same generator).

**ISR-N** (``ScoreHLRSampler``, per image). Each negative's score ``s_i`` is its largest
foreground softmax probability; negatives with ``s_i > score_thr`` (0.05) are *valid*. NMS-match
(mmcv's ``nms_match``) groups the valid ones: greedy NMS at IoU ``>= iou_thr`` (0.5) over the
predicted boxes with scores ``s_i``; each kept box and those it suppresses form a group, in score
order. A negative's importance is its rank in its group (0 for the group's top), and Score-HLR
ranks the valid negatives by (that rank ascending, score descending) across the groups. The
``num_expected`` negatives of lowest HLR are picked; if there are fewer valid negatives, the rest
are drawn uniformly from the invalid ones. Weights: ``(up - HLR) / up`` with ``up = max(
num_expected, num_valid)``, the drawn ones the smallest of these; then ``(bias + (1 - bias) w) **
k`` (k = 0.5, bias = 0); then scaled per image so that the picked negatives' weighted
classification loss (from the read-only pass) sums to the unweighted one.

**ISR-P** (``isr_p``, over the batch). Each positive's IoU is that of the box the head predicts
from it (its ground-truth class's deltas decoded from the RoI, detached) with its ground truth.
IoU-HLR: within each ground truth the positives are ranked by IoU (descending), the local rank;
then within each class all its positives are ranked by (local rank ascending, IoU descending).
The weight is ``(n_max - rank) / n_max`` with ``n_max`` the largest number of positives of one
class in the batch, then ``(bias + (1 - bias) w) ** k`` (k = 2, bias = 0), scaled so that the
positives' weighted classification loss sums to the unweighted one. The weights are constants.

**CARL** (``carl_loss``): ``sum_i w_i * L_reg(i) / R``, over the positives, ``L_reg`` the heads'
smooth-L1 summed over the four deltas, ``R`` the sampled RoIs (the box loss's normaliser), with
``w_i = (bias + (1 - bias) p_i) ** k`` (k = 1, bias = 0.2) scaled to sum to the number of
positives, ``p_i`` the softmax probability of the positive's ground-truth class. ``p_i`` is not
detached: CARL's gradient reaches the classifier, which is the point of the term. It is added to
the losses as ``loss_carl``, beside the usual box loss.

Readings that differ from MMDetection's code, each by construction rather than by accident:

- Ties are broken by index, deterministically (MMDetection's ``sort`` leaves them to the
  device). MMDetection orders IoU-HLR by the sum ``IoU + (n_max - local rank)``, which orders as
  (local rank, IoU) except when an IoU of exactly 1 in one local rank meets an IoU of exactly 0 in
  the one before; the paper's two-step ranking (Sec. 3.1) is the lexicographic order, used here.
- ISR-P compares the predicted box with the ground-truth box itself; MMDetection decodes the
  encoded regression target again, which returns the same box up to rounding.
- The ISR-P weights start from the picks' ``Selection`` weights (1 for PISA's random positives),
  as MMDetection's start from its label weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from hardmine._segments import count_per_segment, segment_rank
from hardmine.boxes import check_boxes, check_finite, greedy_survivors, iou_matrix
from hardmine.sample.quota import check_call, draw, flatten, segment_by_key
from hardmine.sample.random import sample_random
from hardmine.structures import NEGATIVE, POSITIVE, Assignment, RoIScores, Selection, check_fields


@dataclass(frozen=True)
class PISALoss:
    """PISA's training-pass terms, which ``SamplingRoIHeads`` applies after the picks.

    Attributes:
        isr_p: reweight the positives' classification loss by IoU-HLR (``isr_p_weights``).
        isr_p_k: ISR-P's power ``k`` (paper / MMDetection: 2).
        isr_p_bias: ISR-P's shift ``bias`` (0).
        carl: add the classification-aware regression loss ``loss_carl`` (``carl_weights``).
        carl_k: CARL's power ``k`` (1).
        carl_bias: CARL's shift ``bias`` (0.2).
    """

    isr_p: bool = True
    isr_p_k: float = 2.0
    isr_p_bias: float = 0.0
    carl: bool = True
    carl_k: float = 1.0
    carl_bias: float = 0.2


@dataclass(frozen=True)
class PISASampler:
    """PISA as a ``Sampler``: ``sample_pisa`` picks (ISR-N), ``pisa_loss`` weights the training
    pass (ISR-P, CARL). Its fields are the settings; see the module docstring.

    ``num`` and ``pos_fraction`` are random sampling's (MMDetection's PISA Faster R-CNN: 512 and
    0.25). With ``isr_n`` it needs the read-only pass's ``scores`` (``needs_scores``); without, it
    draws the negatives as ``RandomSampler`` does.
    """

    num: int = 512
    pos_fraction: float = 0.25
    isr_n: bool = True
    isr_n_k: float = 0.5
    isr_n_bias: float = 0.0
    score_thr: float = 0.05
    iou_thr: float = 0.5
    isr_p: bool = True
    isr_p_k: float = 2.0
    isr_p_bias: float = 0.0
    carl: bool = True
    carl_k: float = 1.0
    carl_bias: float = 0.2
    needs_losses: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_fields(self)
        check_pisa_settings(
            num=self.num,
            pos_fraction=self.pos_fraction,
            k=self.isr_n_k,
            bias=self.isr_n_bias,
            score_thr=self.score_thr,
            iou_thr=self.iou_thr,
        )
        check_power("isr_p_k", self.isr_p_k, "isr_p_bias", self.isr_p_bias)
        check_power("carl_k", self.carl_k, "carl_bias", self.carl_bias)

    @property
    def needs_scores(self) -> bool:
        """ISR-N ranks by the read-only pass's scores and predicted boxes."""
        return self.isr_n

    @property
    def pisa_loss(self) -> PISALoss | None:
        """The training-pass terms (None when ISR-P and CARL are both off)."""
        if not (self.isr_p or self.carl):
            return None
        return PISALoss(
            isr_p=self.isr_p,
            isr_p_k=self.isr_p_k,
            isr_p_bias=self.isr_p_bias,
            carl=self.carl,
            carl_k=self.carl_k,
            carl_bias=self.carl_bias,
        )

    def __call__(
        self,
        boxes: Sequence[Tensor],
        assignments: Sequence[Assignment],
        *,
        losses: Sequence[Tensor] | None = None,
        mined: Sequence[Tensor] | None = None,
        scores: Sequence[RoIScores] | None = None,
        generator: torch.Generator | None = None,
    ) -> list[Selection]:
        check_call(boxes, assignments, generator)
        if self.isr_n and scores is None:
            raise ValueError(
                "PISASampler with isr_n needs the read-only pass's scores (scores=...), got None"
            )
        return sample_pisa(
            assignments,
            scores,
            num=self.num,
            pos_fraction=self.pos_fraction,
            isr_n=self.isr_n,
            k=self.isr_n_k,
            bias=self.isr_n_bias,
            score_thr=self.score_thr,
            iou_thr=self.iou_thr,
            generator=generator,
        )


#: The largest power ``k`` of ISR-N, ISR-P and CARL taken. The paper's and MMDetection's powers are
#: 0.5 (ISR-N), 2 (ISR-P) and 1 (CARL). A weight ``(bias + (1 - bias) u) ** k`` at ``k = 10``
#: already puts all but a millionth of the weight on the top-ranked examples (CARL's smallest
#: weight ``0.2 ** 10 = 1e-7`` of the largest), so a larger ``k`` chooses nothing new; and it breaks
#: the arithmetic: ``0.2 ** k`` falls below float32's smallest normal number near ``k = 55``, where
#: CARL's normalisation divides zero by zero (a non-finite gradient at ``carl_k`` 60, a NaN
#: ``loss_carl`` at 1e30, reported as a diverging learning rate). Refused when the settings are
#: made, like any other value out of range.
MAX_POWER = 10.0


def check_power(k_name: str, k: float, bias_name: str, bias: float) -> None:
    """Raise ``ValueError`` unless ``k`` lies in ``[0, MAX_POWER]`` and ``bias`` in ``[0, 1]``."""
    if not (math.isfinite(k) and 0 <= k <= MAX_POWER):
        raise ValueError(f"{k_name} must be a finite number in [0, {MAX_POWER:g}], got {k}")
    if not 0.0 <= bias <= 1.0:
        raise ValueError(f"{bias_name} must be in [0, 1], got {bias}")


def check_pisa_settings(
    *, num: int, pos_fraction: float, k: float, bias: float, score_thr: float, iou_thr: float
) -> None:
    """Raise ``ValueError`` naming the first setting of ``sample_pisa`` out of its range."""
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if not 0.0 <= pos_fraction <= 1.0:
        raise ValueError(f"pos_fraction must be in [0, 1], got {pos_fraction}")
    check_power("isr_n_k", k, "isr_n_bias", bias)
    if not 0.0 <= score_thr < 1.0:
        raise ValueError(f"score_thr must be in [0, 1), got {score_thr}")
    if not 0.0 <= iou_thr <= 1.0:
        raise ValueError(f"iou_thr must be in [0, 1], got {iou_thr}")


def nms_match(
    boxes: Tensor, scores: Tensor, segment: Tensor, num_segments: int, iou_thr: float
) -> tuple[Tensor, Tensor]:
    """NMS-match (mmcv's ``nms_match``) in every segment at once: groups of overlapping boxes.

    Greedy NMS visits the boxes by decreasing score (equal scores: lower index first); a box that
    a kept box overlaps by IoU ``>= iou_thr`` (mmcv's comparison) is suppressed and joins that
    kept box's group, of the first such kept box in score order. Each group is its kept box
    followed by the boxes it suppressed, in score order.

    Works on ``[S, M, M]`` tables of pairwise IoUs (``M`` the largest segment), so its memory is
    quadratic in the boxes per segment.

    Args:
        boxes: ``float [N, 4]``.
        scores: ``float [N]``.
        segment: ``int64 [N]`` in ``[0, S)``; negative for boxes that take no part.
        num_segments: ``S``.
        iou_thr: the suppression threshold.

    Returns:
        ``(leader, rank)``, ``int64 [N]`` each: the index of the box's group's kept box, and the
        box's rank in its group (0 for the kept box); -1 for boxes that take no part.

    Example:
        Two overlapping boxes and a third apart: two groups, the second box ranked 1 in the first.

        >>> import torch
        >>> from hardmine.sample.pisa import nms_match
        >>> boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 9], [50, 50, 60, 60]])
        >>> scores = torch.tensor([0.9, 0.8, 0.7])
        >>> leader, rank = nms_match(boxes, scores, torch.zeros(3).long(), 1, 0.5)
        >>> leader.tolist(), rank.tolist()
        ([0, 0, 2], [0, 1, 0])

    Raises:
        ValueError: non-finite or overflowing boxes or non-finite scores (``check_boxes``).
    """
    check_boxes(boxes, "boxes")
    check_finite(scores, "scores")
    return _nms_match(boxes, scores, segment, num_segments, iou_thr)


def _nms_match(
    boxes: Tensor, scores: Tensor, segment: Tensor, num_segments: int, iou_thr: float
) -> tuple[Tensor, Tensor]:
    """``nms_match`` without the input check: the sampler checked its input once."""
    n = scores.numel()
    leader = torch.full((n,), -1, dtype=torch.int64, device=scores.device)
    rank = leader.clone()
    usable = torch.nonzero(segment >= 0).flatten()
    if usable.numel() == 0:
        return leader, rank
    seg = segment[usable]
    # By segment, then by score (descending, lower index first): each segment's row of the table.
    order, column, counts = segment_rank(seg, num_segments, scores[usable])
    width = int(counts.max())
    table = torch.full((num_segments, width), -1, dtype=torch.int64, device=scores.device)
    table[seg[order], column] = usable[order]
    valid = table >= 0
    cand = boxes[table.clamp(min=0)]  # [S, M, 4]
    earlier = torch.ones(width, width, dtype=torch.bool, device=scores.device).tril_(-1)
    overlaps = (iou_matrix(cand, cand) >= iou_thr) & earlier & valid[:, None, :]  # [S, M, M]
    kept = greedy_survivors(overlaps, valid)
    # A suppressed box's group is that of the first kept box (in score order) overlapping it;
    # argmax returns the first of equal maxima.
    first_kept = (overlaps & kept[:, None, :]).to(torch.uint8).argmax(2)  # [S, M]
    cols = torch.arange(width, device=scores.device)
    lead_col = torch.where(kept, cols, first_kept)
    rows = torch.arange(num_segments, device=scores.device)[:, None]
    group = (rows * width + lead_col)[valid]  # row-major cells: score order within a segment
    g_order, g_rank, _ = segment_rank(group, num_segments * width)
    cell_rank = torch.empty_like(g_rank).index_copy_(0, g_order, g_rank)
    members = table[valid]
    leader[members] = table[rows.expand_as(lead_col), lead_col][valid]
    rank[members] = cell_rank
    return leader, rank


def score_hlr(
    boxes: Tensor, scores: Tensor, image: Tensor, num_images: int, valid: Tensor, iou_thr: float
) -> Tensor:
    """ISR-N's Score-HLR of the ``valid`` candidates, per image (see the module docstring).

    NMS-match groups them (``nms_match``); then they are ranked by (rank in group ascending,
    score descending, index ascending) within their image.

    Args:
        boxes: ``float [N, 4]``: the predicted boxes.
        scores: ``float [N]``: the largest foreground probabilities.
        image: ``int64 [N]``: each candidate's image.
        num_images: ``B``.
        valid: ``bool [N]``: the candidates to rank.
        iou_thr: NMS-match's threshold.

    Returns:
        ``int64 [N]``: 0-based HLR within the image where ``valid``, -1 elsewhere.
    """
    _, group_rank = _nms_match(boxes, scores, torch.where(valid, image, -1), num_images, iou_thr)
    index = torch.nonzero(valid).flatten()
    order = torch.argsort(scores[index], descending=True, stable=True)
    order = order[torch.argsort(group_rank[index][order], stable=True)]
    order = order[torch.argsort(image[index][order], stable=True)]
    counts = count_per_segment(valid, image, num_images)
    starts = torch.cumsum(counts, 0) - counts
    hlr = torch.full_like(image, -1)
    sorted_image = image[index][order]
    hlr[index[order]] = torch.arange(index.numel(), device=image.device) - starts[sorted_image]
    return hlr


def _per_image_sum(values: Tensor, image: Tensor, num_images: int) -> Tensor:
    return torch.zeros(num_images, dtype=values.dtype, device=values.device).index_add_(
        0, image, values
    )


def sample_pisa(
    assignments: Sequence[Assignment],
    scores: Sequence[RoIScores] | None = None,
    *,
    num: int = PISASampler.num,
    pos_fraction: float = PISASampler.pos_fraction,
    isr_n: bool = PISASampler.isr_n,
    k: float = PISASampler.isr_n_k,
    bias: float = PISASampler.isr_n_bias,
    score_thr: float = PISASampler.score_thr,
    iou_thr: float = PISASampler.iou_thr,
    generator: torch.Generator | None = None,
) -> list[Selection]:
    """PISA's picks: positives drawn uniformly, negatives by Score-HLR with ISR-N's weights.

    As MMDetection's ``ScoreHLRSampler`` (module docstring): at most ``int(num * pos_fraction)``
    positives, drawn uniformly (weight 1); ``num_expected = min(negatives, num - positives)``
    negatives: the valid ones (``score > score_thr``) of lowest Score-HLR, topped up by a uniform
    draw from the invalid ones, weighted ``(bias + (1 - bias) (up - HLR) / up) ** k`` (the
    top-ups the smallest of these) and scaled so that their weighted classification loss sums to
    the unweighted one, per image. An image without valid negatives draws them uniformly, weight
    1. Ignored candidates are never picked. Without ``isr_n``: ``sample_random``.

    Args:
        assignments: one per image.
        scores: one ``RoIScores`` per image (the read-only pass); unused without ``isr_n``.
        num: picks per image (MMDetection: 512).
        pos_fraction: at most this fraction positive (0.25).
        isr_n: rank and weight the negatives (False: random sampling).
        k: ISR-N's power (0.5).
        bias: ISR-N's shift (0).
        score_thr: a negative is valid when its largest foreground probability exceeds this
            (0.05).
        iou_thr: NMS-match's IoU threshold over the predicted boxes (0.5).
        generator: makes the random draws reproducible.

    Returns:
        One ``Selection`` per image.

    Raises:
        ValueError: settings out of range, ``scores`` missing with ``isr_n``, non-finite or
            mis-sized scores, boxes or losses.
        TypeError: ``scores`` is not a sequence of ``RoIScores``.

    Example:
        One positive and four negatives: two overlapping predictions (a group), one apart and one
        below the score threshold. Three negatives are expected; the two group tops come first
        (HLR 0 and 1, the higher score first), then the suppressed one (HLR 2); the invalid one is
        not needed. Weights ``(3 - HLR) / 3``, square-rooted, scaled so that the weighted losses
        sum as the unweighted ones.

        >>> import torch
        >>> from hardmine.sample.pisa import sample_pisa
        >>> from hardmine.structures import Assignment, RoIScores
        >>> label = torch.tensor([1, 0, 0, 0, 0], dtype=torch.int8)
        >>> a = Assignment(label, torch.zeros(5).long(), torch.zeros(5), label.long())
        >>> pred = torch.tensor([[0.0, 0, 9, 9], [0, 0, 10, 10], [0, 0, 10, 9], [50, 50, 60, 60],
        ...                      [0, 0, 1, 1]])
        >>> s = RoIScores(loss=torch.ones(5), cls_loss=torch.ones(5),
        ...               score=torch.tensor([0.9, 0.6, 0.5, 0.4, 0.01]),
        ...               label=torch.ones(5).long(), box=pred)
        >>> (sel,) = sample_pisa([a], [s], num=4, pos_fraction=0.25)
        >>> sel.mask.tolist()
        [True, True, True, True, False]
        >>> [round(w, 4) for w in sel.weight.tolist()]
        [1.0, 1.2532, 0.7235, 1.0232, 0.0]
    """
    check_pisa_settings(
        num=num, pos_fraction=pos_fraction, k=k, bias=bias, score_thr=score_thr, iou_thr=iou_thr
    )
    if scores is not None and not (
        isinstance(scores, Sequence) and all(isinstance(s, RoIScores) for s in scores)
    ):
        got = type(scores).__name__
        if isinstance(scores, Sequence):
            got = f"a {got} of " + ", ".join(sorted({type(s).__name__ for s in scores}))
        raise TypeError(f"scores must be a sequence of RoIScores, one per image, got {got}")
    if not isr_n:
        return sample_random(assignments, num=num, pos_fraction=pos_fraction, generator=generator)
    if scores is None:
        raise ValueError("sample_pisa with isr_n needs the read-only pass's scores, got None")
    flat = flatten(assignments)
    score = flat.cat([s.score for s in scores], "scores.score")
    flat.check(check_finite, score, "scores.score")
    # Compared in float32 at least: in half, 0.05 itself rounds (bfloat16: to 0.0500488).
    score = score.to(torch.promote_types(score.dtype, torch.float32))
    pred = flat.cat([s.box for s in scores], "scores.box")
    flat.check(check_boxes, pred, "scores.box")
    cls_loss = flat.cat([s.cls_loss for s in scores], "scores.cls_loss")
    flat.check(check_finite, cls_loss, "scores.cls_loss")

    pos, neg = flat.label == POSITIVE, flat.label == NEGATIVE
    num_pos = flat.count(pos).clamp(max=int(num * pos_fraction))  # [B]
    expected = flat.count(neg).minimum(num - num_pos)  # [B]
    pos_pick = draw(
        flat, None, torch.where(pos, 0, -1), num_pos[:, None], max_quota=num, generator=generator
    )

    valid = neg & (score > score_thr)
    hlr = score_hlr(pred, score, flat.image, flat.num_images, valid, iou_thr)
    num_valid = flat.count(valid)
    num_hlr = num_valid.minimum(expected)
    hlr_pick = valid & (hlr < flat.per_image(expected))
    top_up = draw(
        flat,
        None,
        torch.where(neg & ~valid, 0, -1),
        (expected - num_hlr)[:, None],
        max_quota=num,
        generator=generator,
    )
    neg_pick = hlr_pick | top_up

    up = expected.maximum(num_valid).clamp(min=1).to(torch.float32)  # [B]
    w_hlr = (flat.per_image(up) - hlr) / flat.per_image(up)
    # The drawn ones take the smallest HLR weight of their image; 1 where none was ranked.
    w_low = torch.where(num_hlr > 0, (up - (num_hlr - 1)) / up, 1.0)  # [B]
    weight = torch.where(hlr_pick, w_hlr, flat.per_image(w_low))
    weight = (bias + (1 - bias) * weight).pow(k)
    weight = torch.where(neg_pick, weight, 0.0)
    loss = torch.where(neg_pick, cls_loss.to(torch.float32), 0.0)
    before = _per_image_sum(loss, flat.image, flat.num_images)
    after = _per_image_sum(loss * weight, flat.image, flat.num_images)
    ratio = torch.where(after > 0, before / after.clamp(min=torch.finfo(after.dtype).tiny), 1.0)
    weight = weight * flat.per_image(ratio)

    mask = pos_pick | neg_pick
    # At least float32: the weights must not round to the IoUs' half precision.
    weight = torch.where(pos_pick, 1.0, weight).to(
        torch.promote_types(flat.max_iou.dtype, weight.dtype)
    )
    return flat.split(mask, weight)


def isr_p_weights(
    iou: Tensor,
    image: Tensor,
    gt_index: Tensor,
    label: Tensor,
    cls_loss: Tensor,
    weight: Tensor | None = None,
    *,
    k: float = PISALoss.isr_p_k,
    bias: float = PISALoss.isr_p_bias,
) -> Tensor:
    """ISR-P's classification-loss weights of the batch's positives (module docstring).

    Args:
        iou: ``float [P]``: each positive's predicted box's IoU with its ground truth.
        image: ``int64 [P]``: its image.
        gt_index: ``int64 [P]``: its ground truth in that image.
        label: ``int64 [P]``: its class.
        cls_loss: ``float [P]``: its classification loss (unweighted).
        weight: ``float [P]``: the weights it had (its ``Selection`` weight); 1 when None.
        k: the power (2).
        bias: the shift (0).

    Returns:
        ``float [P]``, no gradient: the new weights, whose ``sum(w * cls_loss)`` is
        ``sum(weight * cls_loss)``.

    Example:
        One ground truth of class 1 with three positives, IoU 0.9, 0.5 and 0.7: IoU-HLR 0, 2, 1
        and ``n_max = 3``, so weights ``((3 - HLR) / 3) ** 2`` = 1, 1/9, 4/9 before the scaling
        (equal losses: by 3 / (14 / 9)).

        >>> import torch
        >>> from hardmine.sample.pisa import isr_p_weights
        >>> w = isr_p_weights(torch.tensor([0.9, 0.5, 0.7]), torch.zeros(3).long(),
        ...                   torch.zeros(3).long(), torch.ones(3).long(), torch.ones(3))
        >>> [round(x, 4) for x in w.tolist()]
        [1.9286, 0.2143, 0.8571]
    """
    check_power("isr_p_k", k, "isr_p_bias", bias)
    num = iou.numel()
    iou, cls_loss = iou.detach().float(), cls_loss.detach().float()
    base = torch.ones_like(iou) if weight is None else weight.detach().float()
    if num == 0:
        return base
    everyone = torch.ones(num, dtype=torch.bool, device=iou.device)
    gt = segment_by_key(image, gt_index, everyone)  # one segment per (image, ground truth)
    order, rank, _ = segment_rank(gt, num, iou)  # by IoU, descending, within the ground truth
    local = torch.empty_like(rank).index_copy_(0, order, rank)
    # Within each class: (local rank ascending, IoU descending, index ascending).
    order = torch.argsort(iou, descending=True, stable=True)
    order = order[torch.argsort(local[order], stable=True)]
    order = order[torch.argsort(label[order], stable=True)]
    counts = torch.bincount(label)
    starts = torch.cumsum(counts, 0) - counts
    hlr = torch.empty_like(order)
    hlr[order] = torch.arange(num, device=iou.device) - starts[label[order]]
    n_max = counts.max().to(torch.float32)
    new = base * (n_max - hlr) / n_max
    new = (bias + (1 - bias) * new).pow(k)
    before, after = (cls_loss * base).sum(), (cls_loss * new).sum()
    return new * (before / after) if bool(after > 0) else new


def carl_weights(prob: Tensor, *, k: float = PISALoss.carl_k, bias: float = PISALoss.carl_bias):
    """CARL's weights of the positives: ``(bias + (1 - bias) p) ** k`` scaled to sum to their
    number, *with* the gradient of ``p`` (module docstring).

    Args:
        prob: ``float [P]``: each positive's softmax probability of its ground-truth class.
        k: the power (1).
        bias: the shift (0.2).

    Returns:
        ``float [P]``.

    Example:
        >>> import torch
        >>> from hardmine.sample.pisa import carl_weights
        >>> carl_weights(torch.tensor([1.0, 0.0]))  # 1 and 0.2, scaled to sum to 2
        tensor([1.6667, 0.3333])
    """
    check_power("carl_k", k, "carl_bias", bias)
    if prob.numel() == 0:
        return prob
    weight = (bias + (1 - bias) * prob).pow(k)
    return weight * (prob.numel() / weight.sum())
