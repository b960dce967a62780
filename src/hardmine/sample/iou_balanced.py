"""IoU-balanced negatives and instance-balanced positives: Libra R-CNN (Pang et al., CVPR 2019)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
from torch import Tensor

from hardmine._host import host_tensor
from hardmine._segments import segment_rank
from hardmine.boxes import check_finite, upcast
from hardmine.sample.quota import (
    FlatBatch,
    _count_between,
    check_call,
    draw,
    fill_shortfall,
    flatten,
    random_keys,
    segment_by_key,
)
from hardmine.structures import NEGATIVE, POSITIVE, Assignment, Selection, check_fields, settings


@dataclass(frozen=True)
class IoUBalancedSampler:
    """``sample_iou_balanced`` as a ``Sampler``; its fields are the settings (see there)."""

    num: int = 512
    pos_fraction: float = 0.25
    num_bins: int = 3
    neg_thr: float = 0.5
    floor_thr: float = -1.0
    floor_fraction: float = 0.0
    instance_balanced: bool = True
    needs_losses: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_fields(self)
        check_iou_balanced_settings(**settings(self))

    def __call__(
        self,
        boxes: Sequence[Tensor],
        assignments: Sequence[Assignment],
        *,
        losses: Sequence[Tensor] | None = None,
        mined: Sequence[Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> list[Selection]:
        check_call(boxes, assignments, generator)
        return sample_iou_balanced(assignments, **settings(self), generator=generator)


def sample_instance_balanced(
    flat: FlatBatch,
    eligible: Tensor,
    target: Tensor,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick ``target`` candidates per image, spread evenly over the ground truths they match.

    Libra R-CNN's instance-balanced positives (Pang et al., CVPR 2019; the paper's text is not in
    ``papers/``, MMDetection's sampler is its reference): an equal number of positives for each
    ground truth, so that large objects, which match many more proposals, do not take the
    batch. The picks go round the ground truths:
    each one's eligible candidates in a random order, the ground truths in a random order, and
    every round takes the next candidate of each ground truth that has one left, until the image
    has ``target``. So

    * every ground truth gets ``target // G`` or one more (``G`` ground truths), or all its
      candidates when it has fewer, their unused share going round the others: every ground
      truth keeps its full even share;
    * with ``target < G``, ``target`` of the ``G`` ground truths, chosen uniformly at random,
      get one pick each, and none gets two.

    MMDetection's ``InstanceBalancedPosSampler`` gives each ground truth up to
    ``round(target / G) + 1`` and then trims the surplus uniformly over the picks, which favours
    ground truths with more candidates: with 40 ground truths (one with 200 candidates, the others
    with 2) and 32 picks, it covers 26 ground truths on average where this covers 32, and the
    large one keeps 0.8 picks on average in both (``tests/sample/test_iou_balanced.py``).

    Args:
        flat: the batch; ``flat.gt_index`` names each candidate's ground truth.
        eligible: ``bool [N]``, usually the positives.
        target: ``int64 [B]``, picks wanted per image (more than the eligible takes them all).
        generator: makes the picks reproducible.

    Returns:
        ``bool [N]``.

    Example:
        Ground truth 0 has three positives, ground truth 1 one; two picks: one each, so the lone
        positive of ground truth 1 is always picked.

        >>> import torch
        >>> from hardmine.sample.iou_balanced import sample_instance_balanced
        >>> from hardmine import assign_max_iou
        >>> from hardmine.sample.quota import flatten
        >>> gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]])
        >>> boxes = [[0, 0, 10, 10], [0, 0, 10, 11], [0, 0, 11, 10], [50, 50, 60, 60]]
        >>> boxes = torch.tensor(boxes, dtype=torch.float32)
        >>> (a,) = assign_max_iou([boxes], [gt], [torch.tensor([1, 2])])
        >>> flat = flatten([a])
        >>> mask = sample_instance_balanced(flat, flat.label == 1, torch.tensor([2]))
        >>> int(mask[:3].sum()), bool(mask[3])
        (1, True)
    """
    n = eligible.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.bool, device=flat.device)
    # The CPU path reads rand's float32 keys as bits (a float64 default dtype draws others).
    if flat.device.type == "cpu" and torch.get_default_dtype() == torch.float32:
        return _instance_balanced_cpu(flat, eligible, target, generator)
    segment = segment_by_key(flat.image, flat.gt_index, eligible)  # one per (image, gt), [N]
    seg = torch.where(segment >= 0, segment, n)  # slot n: the ineligible
    # Each candidate's round: its rank among its ground truth's candidates in a random order.
    shuffle = random_keys(None, like=flat.max_iou, generator=generator)
    order, sorted_rank, _ = segment_rank(seg, n + 1, shuffle)
    round_ = torch.empty_like(sorted_rank).index_copy_(0, order, sorted_rank)  # [N]
    # Within a round, the ground truths in a random order: a priority in [0, 1) per segment.
    priority = torch.rand(n + 1, generator=generator, device=flat.device, dtype=torch.float64)
    key = torch.where(segment >= 0, -(round_ + priority[seg]), float("-inf"))  # float64 [N]
    order, sorted_rank, _ = segment_rank(flat.image, flat.num_images, key)
    rank = torch.empty_like(sorted_rank).index_copy_(0, order, sorted_rank)  # [N] within image
    return (segment >= 0) & (rank < flat.per_image(target))


def _instance_balanced_cpu(
    flat: FlatBatch, eligible: Tensor, target: Tensor, generator: torch.Generator | None
) -> Tensor:
    """``sample_instance_balanced`` on the CPU, where a host sync is free: the same random
    numbers and the same picks, with the work on the eligible candidates only and two sorts fewer.

    One stable sort of an ``int64`` key per eligible candidate, (image, ground truth) above its
    shuffle key, gives every candidate its round; then the ``target``-th smallest ``round +
    priority`` of each image, from one ``topk`` over a table of the images, is the threshold.
    """
    n = eligible.numel()
    # The generic path's random numbers, in its order, so that the picks are the same.
    shuffle = torch.rand(n, generator=generator)  # [N]
    priority = torch.rand(n + 1, generator=generator, dtype=torch.float64)  # [N + 1]
    index = torch.nonzero(eligible).squeeze(1)  # [P], ascending
    picked = torch.zeros(n, dtype=torch.bool)
    if index.numel() == 0:
        return picked
    image = flat.image.index_select(0, index)  # [P]
    gt = flat.gt_index.index_select(0, index)  # [P]
    # (image, ground truth) in the high bits, the shuffle key below them, descending: rand's
    # floats lie in [0, 1), where a float32's bits order as it does and stay below 2^30.
    bits = shuffle.index_select(0, index).view(torch.int32).to(torch.int64)
    segment = image * (int(gt.max()) + 1) + gt  # [P]
    key = torch.add(bits.neg_().add_((1 << 30) - 1), segment, alpha=1 << 30)
    # Stable: equal shuffle keys keep the index order, as the generic path's stable sorts do.
    key, order = key.sort(stable=True)
    key >>= 30  # the segment of each sorted candidate
    new_run = torch.empty_like(key, dtype=torch.bool)
    new_run[0] = True
    torch.ne(key[1:], key[:-1], out=new_run[1:])
    at = torch.arange(key.numel())
    round_ = at - (at * new_run).cummax(0).values  # [P]: rank in its segment
    # Segments are numbered in (image, ground truth) order, as segment_by_key numbers them.
    value = priority.index_select(0, new_run.cumsum(0).sub_(1)).add_(round_)  # float64 [P]
    # An image's candidates are contiguous in the sorted order: a table [B, P_max] of values.
    sorted_image = image.index_select(0, order)
    counts = torch.bincount(image, minlength=flat.num_images)  # [B]
    width = int(counts.max())
    offset = torch.arange(flat.num_images).mul_(width).add_(counts).sub_(counts.cumsum(0))
    table = torch.full((flat.num_images, width), float("inf"), dtype=torch.float64)
    table.view(-1).index_copy_(0, offset.index_select(0, sorted_image).add_(at), value)
    take = target.minimum(counts).clamp_(min=0)  # [B]
    k = int(take.max())
    if k == 0:
        return picked
    smallest = table.topk(k, dim=1, largest=False).values  # [B, k], ascending
    threshold = smallest.gather(1, take.sub(1).clamp_(min=0)[:, None]).squeeze(1)
    threshold.masked_fill_(take == 0, float("-inf"))  # [B]
    chosen = value <= threshold.index_select(0, sorted_image)  # [P]
    # Every image has at least ``take`` at or below its threshold; more only where values in
    # one image are equal (different ground truths whose float64 sums coincide), which the
    # generic path orders by index.
    if int(chosen.sum()) > int(take.sum()):
        by_index = torch.empty_like(value).index_copy_(0, order, value)
        sorted_at, rank, _ = segment_rank(image, flat.num_images, -by_index)
        chosen_at = sorted_at[rank < target[image[sorted_at]]]
        return picked.index_fill_(0, index[chosen_at], True)
    return picked.index_fill_(0, index.index_select(0, order.masked_select(chosen)), True)


def check_iou_balanced_settings(
    *,
    num: int,
    pos_fraction: float,
    num_bins: int,
    neg_thr: float,
    floor_thr: float,
    floor_fraction: float,
    instance_balanced: bool,
) -> None:
    """Raise ``ValueError`` naming the first setting of ``sample_iou_balanced`` out of its range."""
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if not 0.0 <= pos_fraction <= 1.0:
        raise ValueError(f"pos_fraction must be in [0, 1], got {pos_fraction}")
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    if not 0.0 < neg_thr <= 1.0:
        raise ValueError(f"neg_thr must be in (0, 1], got {neg_thr}")
    if not floor_thr < neg_thr:
        raise ValueError(f"floor_thr ({floor_thr}) must be below neg_thr ({neg_thr})")
    if not 0.0 <= floor_fraction <= 1.0:
        raise ValueError(f"floor_fraction must be in [0, 1], got {floor_fraction}")


def sample_iou_balanced(
    assignments: Sequence[Assignment],
    *,
    num: int = IoUBalancedSampler.num,
    pos_fraction: float = IoUBalancedSampler.pos_fraction,
    num_bins: int = IoUBalancedSampler.num_bins,
    neg_thr: float = IoUBalancedSampler.neg_thr,
    floor_thr: float = IoUBalancedSampler.floor_thr,
    floor_fraction: float = IoUBalancedSampler.floor_fraction,
    instance_balanced: bool = IoUBalancedSampler.instance_balanced,
    generator: torch.Generator | None = None,
) -> list[Selection]:
    """Libra R-CNN sampling: negatives balanced over IoU bins, positives over ground truths.

    Per image, as ``sample_random``: ``int(num * pos_fraction)`` positives at most, negatives fill
    the rest of ``num``. Negatives (Pang et al., CVPR 2019, section 3.1):

    1. With ``floor_thr >= 0`` the negatives with ``max_iou < floor_thr`` (``== 0`` when
       ``floor_thr == 0``) form a *floor* group; the others are *balanced*. ``floor_thr < 0``
       means no floor group.
    2. The balanced ones fall into ``num_bins`` equal IoU bins over ``[max(floor_thr, 0),
       neg_thr)`` (negatives at or above ``neg_thr``, possible with an assigner whose negative
       threshold is higher, count in the top bin). Each bin gets
       ``num_balanced // num_bins`` with ``num_balanced = int(num_neg * (1 - floor_fraction))``.
    3. The shortfall of the bins is filled uniformly from the balanced negatives, then the floor
       group tops up to ``num_neg``, then any negative does.

    That is MMDetection's ``IoUBalancedNegSampler`` with two differences, both deliberate:
    it is stateless (MMDetection sets ``floor_thr = 0`` on its first call with a negative
    ``floor_thr``, so from the second call on zero-IoU negatives are only filler), and the bins
    span the negative IoU range, not ``[floor_thr, max IoU of all proposals)``, which includes
    positives and ground-truth copies and so leaves the top bins empty of negatives.

    Positives: with ``instance_balanced`` (the paper's setting), an even share per ground truth
    (``sample_instance_balanced``); otherwise uniform.

    Args:
        assignments: one per image; ``max_iou`` drives the bins.
        num: candidates per image.
        pos_fraction: at most this fraction positive.
        num_bins: IoU bins ``K`` (paper: 3).
        neg_thr: top of the negative IoU range, the assigner's negative threshold (0.5).
        floor_thr: below it, negatives form the floor group; negative disables it.
        floor_fraction: the floor group's share of the negative quota.
        instance_balanced: balance positives over ground truths.
        generator: makes the picks reproducible.

    Returns:
        One ``Selection`` per image, weight 1 on the picks.

    Raises:
        ValueError: on non-finite ``max_iou`` or inconsistent settings.

    Example:
        A positive and four negatives at IoU 0, 0, 0.25 and 0.4 with the ground truth: three
        negative picks, one from each of the bins [0, 1/6), [1/6, 1/3), [1/3, 1/2).

        >>> import torch
        >>> from hardmine.sample.iou_balanced import sample_iou_balanced
        >>> from hardmine import assign_max_iou
        >>> gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
        >>> boxes = [[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]]
        >>> boxes += [[0, 0, 10, 40], [0, 0, 10, 25]]
        >>> boxes = torch.tensor(boxes, dtype=torch.float32)
        >>> (a,) = assign_max_iou([boxes], [gt], [torch.tensor([1])])
        >>> mask = sample_iou_balanced([a], num=4, pos_fraction=0.25)[0].mask
        >>> mask[[0, 3, 4]].tolist(), int(mask[1:3].sum())
        ([True, True, True], 1)
    """
    check_iou_balanced_settings(
        num=num,
        pos_fraction=pos_fraction,
        num_bins=num_bins,
        neg_thr=neg_thr,
        floor_thr=floor_thr,
        floor_fraction=floor_fraction,
        instance_balanced=instance_balanced,
    )
    flat = flatten(assignments)
    iou = upcast(flat.max_iou)  # the bin arithmetic in float32 even for half-precision IoUs
    # A sum is finite when every term is: one reduction, where isfinite and all make two passes.
    if not bool(torch.isfinite(iou.sum())):
        check_finite(iou, "max_iou")
    labels = host_tensor([[POSITIVE], [NEGATIVE]], flat.device, torch.int8)
    member = flat.label[None] == labels  # [2, N]: positives, negatives
    pos, neg = member
    counts = _count_between(member, flat.bounds)  # [2, B]
    num_pos = counts[0].clamp(max=int(num * pos_fraction))  # [B]
    num_neg = counts[1].minimum(num - num_pos)  # [B]
    nothing = torch.zeros_like(pos)
    fill = partial(_top_up, flat, max_quota=num, generator=generator)

    if instance_balanced:
        pos_mask = sample_instance_balanced(flat, pos, num_pos, generator=generator)
    else:
        pos_mask = fill(nothing, pos, num_pos)

    if floor_thr > 0:
        floor = neg & (iou < floor_thr)
    elif floor_thr == 0:
        floor = neg & (iou <= 0)
    else:
        floor = nothing
    balanced = neg & ~floor if floor_thr >= 0 else neg
    low = max(floor_thr, 0.0)
    bin_index = (iou - low).div_((neg_thr - low) / num_bins).floor_().clamp_(0, num_bins - 1)
    group = bin_index.to(torch.int64).masked_fill_(~balanced, -1)
    num_balanced = (num_neg * (1.0 - floor_fraction)).floor().long()  # [B]
    quota = (num_balanced // num_bins)[:, None].expand(-1, num_bins)  # [B, K]
    neg_mask = draw(flat, None, group, quota, max_quota=num // num_bins, generator=generator)
    neg_mask = fill(neg_mask, balanced, num_balanced)
    # Without a floor group the balanced ones are all the negatives, so the floor's top-up is
    # empty, and with no quota set aside for it neither is the last one: skip both passes.
    if floor_thr >= 0:
        neg_mask = fill(neg_mask, floor, num_neg)
    if floor_thr >= 0 or floor_fraction > 0:
        neg_mask = fill(neg_mask, neg, num_neg)
    return flat.split(pos_mask | neg_mask)


def _top_up(
    flat: FlatBatch,
    picked: Tensor,
    eligible: Tensor,
    target: Tensor,
    *,
    max_quota: int,
    generator: torch.Generator | None,
) -> Tensor:
    """``fill_shortfall``; on the CPU, where a host sync is free and the bins are usually full,
    an image short of nothing skips the draw's passes but for its random numbers (drawn all the
    same, so that the generator's stream goes on as before)."""
    if flat.device.type == "cpu" and int((target - flat.count(picked)).max()) <= 0:
        torch.randint(1 << 62, (flat.total,), generator=generator)  # as quota.draw
        return picked
    return fill_shortfall(flat, picked, eligible, target, max_quota=max_quota, generator=generator)
