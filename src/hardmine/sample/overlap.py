"""The Overlap Sampler: pick by the overlap among examples (Chen et al., "Overlap Sampler for
Region-Based Object Detection", WACV 2020).

No reference implementation is public, so every choice the paper leaves open is written down in
``sample_overlap``'s docstring.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import ClassVar, Literal, get_args

import torch
from torch import Tensor

from hardmine.boxes import box_iou, check_boxes, check_finite, upcast
from hardmine.sample.quota import (
    FlatBatch,
    draw,
    fill_shortfall,
    flatten,
    segment_by_key,
    take_top_in_segments,
)
from hardmine.structures import NEGATIVE, POSITIVE, Assignment, Selection, settings

Strategy = Literal["uniform", "hard", "soft", "linear"]


@dataclass(frozen=True)
class OverlapSampler:
    """``sample_overlap`` as a ``Sampler``; its fields are the settings (see there)."""

    num: int = 512
    pos_fraction: float = 0.25
    strategy: Strategy = "soft"
    pos_strategy: Strategy = "uniform"
    num_bins: int = 2
    hard_thr: float = 0.5
    upper: float = 0.7
    epsilon: float = 2.0
    needs_losses: ClassVar[bool] = False

    def __call__(
        self,
        boxes: Sequence[Tensor],
        assignments: Sequence[Assignment],
        *,
        losses: Sequence[Tensor] | None = None,
        mined: Sequence[Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> list[Selection]:
        return sample_overlap(boxes, assignments, **settings(self), generator=generator)


def overlap_with_positives(
    boxes: Tensor,
    flat: FlatBatch,
    positive: Tensor,
    *,
    with_pe: bool = True,
    budget: int = 1 << 20,
) -> tuple[Tensor, Tensor]:
    """Each candidate's largest IoU with a positive of its image, and each positive's with another.

    The batch is padded to ``[B, N_max, 4]`` and compared with its positives padded to
    ``[B, P_max, 4]``, a chunk of positives at a time. Chunks hold about ``budget`` IoUs, so
    memory stays bounded whatever ``P_max`` is, and the blocks stay small enough to live in cache
    (the arithmetic per IoU is tiny, so memory traffic is what costs). Padding is zero-area
    boxes, whose IoU with anything is 0, the floor of both maxima anyway.

    Args:
        boxes: ``float [N, 4]``, the flat batch's candidates.
        flat: the batch.
        positive: ``bool [N]``.
        with_pe: also compute ``iou_pe`` (else it is all 0).
        budget: IoUs per block.

    Returns:
        ``iou_pn: float [N]``: max IoU with any positive of the same image (a positive's own IoU
        of 1 included; 0 in an image without positives), and ``iou_pe: float [N]``: for
        positives, max IoU with any *other* candidate of the image, 0 elsewhere.
    """
    boxes = upcast(boxes)  # the maxima are stored in the boxes' type: never a half one
    n, b = boxes.shape[0], flat.num_images
    pos_count = flat.count(positive)  # [B]
    # The one host read: P_max sizes the padded positives. It follows input validation, which
    # synchronises anyway.
    p_max = int(pos_count.max()) if n else 0
    if p_max == 0:
        return boxes.new_zeros(n), boxes.new_zeros(n)
    row = flat.position
    padded = boxes.new_zeros(b, flat.max_size, 4)  # [B, N_max, 4]
    padded[flat.image, row] = boxes
    rank = torch.cumsum(positive, 0) - 1 - (torch.cumsum(pos_count, 0) - pos_count)[flat.image]
    col = torch.where(positive, rank, p_max)  # non-positives land in a spare column, dropped
    pos_boxes = boxes.new_zeros(b, p_max + 1, 4)
    pos_boxes[flat.image, col] = boxes
    pos_row = torch.zeros((b, p_max + 1), dtype=torch.int64, device=boxes.device)
    pos_row[flat.image, col] = row
    pos_boxes, pos_row = pos_boxes[:, :p_max], pos_row[:, :p_max]  # [B, P_max, 4], [B, P_max]

    chunk = max(1, budget // (b * flat.max_size))
    best_pn = boxes.new_zeros(b, flat.max_size)  # [B, N_max]
    best_pe = boxes.new_zeros(b, p_max)  # [B, P_max]
    for start in range(0, p_max, chunk):
        iou = box_iou(padded, pos_boxes[:, start : start + chunk])  # [B, N_max, c]
        torch.maximum(best_pn, iou.amax(2), out=best_pn)
        if with_pe:
            # A positive's own IoU (1) would always win: zero that one cell per positive. Padded
            # positives point at row 0, where their IoU is 0 anyway.
            own = pos_row[:, None, start : start + chunk]  # [B, 1, c]
            best_pe[:, start : start + chunk] = iou.scatter_(1, own, 0).amax(1)
    iou_pn = best_pn[flat.image, row]
    iou_pe = torch.where(positive, best_pe[flat.image, rank.clamp(min=0)], 0)
    return iou_pn, iou_pe


def _pick(
    strategy: Strategy,
    flat: FlatBatch,
    eligible: Tensor,
    overlap: Tensor,
    target: Tensor,
    *,
    num_bins: int,
    hard_thr: float,
    upper: float,
    max_quota: int,
    generator: torch.Generator | None,
) -> Tensor:
    """``target: [B]`` picks per image from ``eligible: [N]`` by ``overlap: [N]`` -> ``bool [N]``.

    Every strategy ends with a uniform top-up from the eligible not yet picked.
    """
    nothing = torch.zeros_like(eligible)
    fill = partial(fill_shortfall, flat, max_quota=max_quota, generator=generator)
    if strategy == "hard":
        picked = fill(nothing, eligible & (overlap >= hard_thr), target)
    elif strategy == "soft":
        bin_index = (overlap / (upper / num_bins)).floor().long().clamp(0, num_bins - 1)
        quota = (target // num_bins)[:, None].expand(-1, num_bins)  # [B, K]
        group = torch.where(eligible, bin_index, -1)
        picked = draw(
            flat,
            None,
            group,
            quota,
            max_quota=max_quota // num_bins,
            generator=generator,
        )
    elif strategy == "linear":
        # Weight 0 is never drawn, so zero-overlap candidates only come in with the top-up.
        picked = fill(nothing, eligible, target, weight=overlap)
    else:  # uniform: the top-up is the whole draw
        picked = nothing
    return fill(picked, eligible, target)


def sample_overlap(
    boxes: Sequence[Tensor],
    assignments: Sequence[Assignment],
    *,
    num: int = OverlapSampler.num,
    pos_fraction: float = OverlapSampler.pos_fraction,
    strategy: Strategy = OverlapSampler.strategy,
    pos_strategy: Strategy = OverlapSampler.pos_strategy,
    num_bins: int = OverlapSampler.num_bins,
    hard_thr: float = OverlapSampler.hard_thr,
    upper: float = OverlapSampler.upper,
    epsilon: float = OverlapSampler.epsilon,
    generator: torch.Generator | None = None,
) -> list[Selection]:
    """The Overlap Sampler (Chen et al., WACV 2020): sample by IoU among the candidates.

    Quotas per image are those of ``sample_random``: ``int(num * pos_fraction)`` positives at
    most, negatives fill the rest of ``num``; ignored candidates are never picked. The defaults
    are the paper's best setting: soft sampling with 2 bins and ε = 2.

    Choices made here, since the paper has no public code:

    * **IoU(p,n)** of a negative is its largest IoU with any positive candidate (assignment label
      1) of the same image. The candidates include ground-truth copies when the model integration
      appends them, and those copies are positives, so then IoU(p,n) >= the negative's
      ``max_iou``. In an image without positives every IoU(p,n) is 0 and all strategies are uniform.
    * **IoU(p,e)** of a positive is its largest IoU with any *other* candidate of the image
      (positive, negative or ignored; itself excluded).
    * **uniform**: a uniform draw. **hard**: the candidates with overlap >= ``hard_thr`` (θ)
      first, uniformly among them when they exceed the quota; the rest uniformly.
      **soft**: ``num_bins`` (K) equal bins over ``[0, upper)``, each with quota
      ``target // K``; an overlap >= ``upper`` counts in the top bin rather than being dropped,
      since such a near-duplicate of a positive is the hardest negative of all. ``upper``
      defaults to 0.7, the RPN's NMS threshold, above which proposals are rare.
      **linear**: a draw without replacement with weight = overlap (each successive draw picks
      a candidate with probability proportional to its overlap among those left); zero-overlap
      candidates are only drawn to fill the shortfall.
    * Every strategy fills its shortfall (empty bins, too few hard ones) uniformly from the
      remaining eligible candidates, so the quota is met whenever enough candidates exist.
    * **Positives** use ``pos_strategy`` on IoU(p,e) when they exceed their quota (otherwise all
      are taken, whatever the strategy). It defaults to ``uniform``: in a two-stage detector the
      positives rarely fill their quota, the paper's gains are attributed to the negatives and
      ε, and uniform positives keep that side equal to the random baseline.
    * **ε**: after picking, in every image each ground truth's best-matched picked positive
      (largest ``max_iou`` among the picked positives of that ground truth; ties go to the lower
      candidate index) gets loss weight ``epsilon``; all other picks weigh 1. ``epsilon=1``
      disables it.

    Args:
        boxes: ``float [N_i, 4]`` candidates per image, in the assignments' order.
        assignments: one per image.
        num: candidates per image.
        pos_fraction: at most this fraction positive.
        strategy: how negatives are drawn by IoU(p,n).
        pos_strategy: how positives are drawn by IoU(p,e) when they exceed their quota.
        num_bins: K for ``soft``.
        hard_thr: θ for ``hard``.
        upper: top of the ``soft`` bins.
        epsilon: loss weight of each ground truth's best-matched picked positive.
        generator: makes the picks reproducible.

    Returns:
        One ``Selection`` per image; weight 1 on the picks, ``epsilon`` on the best-matched ones.

    Raises:
        ValueError: on non-finite boxes or ``max_iou``, mismatched sizes, or bad settings.

    Example:
        A positive, a negative overlapping it by IoU 0.4 and three far ones; two negative picks,
        one per soft bin ([0, 0.35) and [0.35, 0.7)), so the overlapping one is always picked; the
        ground truth's best positive weighs ε = 2.

        >>> from hardmine import assign_max_iou
        >>> gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
        >>> boxes = [[0, 0, 10, 10], [0, 0, 10, 25], [20, 20, 30, 30]]
        >>> boxes += [[40, 40, 50, 50], [60, 0, 70, 9]]
        >>> boxes = torch.tensor(boxes, dtype=torch.float32)
        >>> (a,) = assign_max_iou([boxes], [gt], [torch.tensor([1])])
        >>> (s,) = sample_overlap([boxes], [a], num=3, pos_fraction=1 / 3)
        >>> s.mask[:2].tolist(), int(s.mask[2:].sum()), s.weight[:2].tolist()
        ([True, True], 1, [2.0, 1.0])
    """
    for name, value in (("strategy", strategy), ("pos_strategy", pos_strategy)):
        if value not in get_args(Strategy):
            raise ValueError(f"{name} must be one of {get_args(Strategy)}, got {value!r}")
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    if upper <= 0:
        raise ValueError(f"upper must be positive, got {upper}")
    if epsilon <= 0:
        raise ValueError(f"epsilon must be positive, got {epsilon}")
    flat = flatten(assignments)
    flat_boxes = flat.cat(boxes, "boxes")
    check_boxes(flat_boxes, "boxes")
    check_finite(flat.max_iou, "max_iou")
    pos, neg = flat.label == POSITIVE, flat.label == NEGATIVE
    num_pos = flat.count(pos).clamp(max=int(num * pos_fraction))  # [B]
    num_neg = flat.count(neg).minimum(num - num_pos)  # [B]
    # Uniform strategies never look at the overlaps: skip what neither side needs.
    if strategy == "uniform" and pos_strategy == "uniform":
        iou_pn = iou_pe = torch.zeros_like(flat.max_iou)
    else:
        with_pe = pos_strategy != "uniform"
        iou_pn, iou_pe = overlap_with_positives(flat_boxes, flat, pos, with_pe=with_pe)
    pick = partial(_pick, num_bins=num_bins, hard_thr=hard_thr, upper=upper, generator=generator)
    pos_mask = pick(pos_strategy, flat, pos, iou_pe, num_pos, max_quota=int(num * pos_fraction))
    neg_mask = pick(strategy, flat, neg, iou_pn, num_neg, max_quota=num)
    mask = pos_mask | neg_mask
    weight = mask.to(flat.max_iou.dtype)
    if epsilon != 1.0:
        keys = torch.where(pos_mask, flat.max_iou, float("-inf"))
        per_gt = segment_by_key(flat.image, flat.gt_index, pos_mask)
        best = take_top_in_segments(keys, per_gt, torch.ones_like(per_gt))
        weight = torch.where(best, epsilon, weight)
    return flat.split(mask, weight)
