"""IoU-balanced negatives and instance-balanced positives: Libra R-CNN (Pang et al., CVPR 2019)."""

from __future__ import annotations

import math
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

    On the CPU the round robin is not walked: its outcome depends only on the counts per ground
    truth (``_round_robin``), and each ground truth's picks are a uniform draw from its
    candidates (``_pick``). The distribution is the one above; the random numbers, and so the
    picks for a given seed, differ from those of hardmine before this change and from the CUDA
    path, which walks the rounds by sorting (no host synchronisation).

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
    if flat.device.type == "cpu":
        key = torch.randint(1 << _KEY_BITS, (n,), generator=generator)  # [N]
        gt = torch.where(eligible, flat.gt_index, -1)  # [N]
        num_gts = int(gt.max()) + 1  # 0 when nothing is eligible
        segment = torch.where(eligible, flat.image * num_gts + gt, -1)  # [N]
        segments = flat.num_images * num_gts
        counts = torch.bincount(segment + 1, minlength=segments + 1)[1:]
        counts = counts.view(flat.num_images, num_gts)  # [B, G]
        target = target.minimum(counts.sum(1)).clamp_(min=0)  # [B]
        shares = _round_robin(counts, target, int(target.max()), generator)
        return _smallest_per_segment(segment, segments, shares.flatten(), key)[0]
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


def _round_robin(
    counts: Tensor, target: Tensor, most: int, generator: torch.Generator | None
) -> Tensor:
    """CPU: the picks each ground truth gets from the round robin: ``int64 [B, G]``.

    The outcome needs only the counts (``counts: int64 [B, G]``, ``target: int64 [B]``, at most
    the image's candidates): with ``R`` complete rounds (the most whose picks,
    ``sum_g min(count_g, R)``, stay within the target), every ground truth gets
    ``min(count_g, R)``, and the picks left go one each to the ground truths with more than
    ``R`` candidates, in a random order (the partial round's order). ``most`` bounds ``target``.
    """
    rounds = torch.arange(1, most + 1)  # [R]
    after = counts[:, :, None].minimum(rounds).sum(1)  # [B, R]: picks after r rounds
    full = (after <= target[:, None]).sum(1, keepdim=True)  # [B, 1]
    shares = counts.minimum(full)  # [B, G]
    left = target - shares.sum(1)  # [B]
    priority = torch.rand(counts.shape, generator=generator)  # [B, G]
    priority.masked_fill_(counts <= full, 2.0)  # those with none left come last
    rank = priority.argsort(dim=1, stable=True).argsort(dim=1)  # [B, G]
    return shares.add_(rank < left[:, None])


# Keys are 31-bit random integers; their top bits bucket them for _pick's histogram.
_KEY_BITS = 31
_BUCKET_BITS = 6


def _pick(
    segment: Tensor, comp: Tensor, hist: Tensor, running: Tensor, quota: Tensor
) -> tuple[Tensor, Tensor]:
    """CPU: in every segment, the ``quota`` candidates with the smallest random key.

    A uniform draw without replacement, with no sort of the batch: a histogram of the keys' top
    bits per segment says in which bucket each segment's quota runs out; the candidates below
    that bucket are picked, and only the few in it are sorted.

    Args:
        segment: ``int64 [N]`` in ``[0, S)``.
        comp: ``int64 [N]``: ``segment * 2^31 + key``, ``key`` in ``[0, 2^31)``; its top
            ``_BUCKET_BITS`` bits are the bucket.
        hist: ``int64 [S, H]``: candidates per segment and bucket; ``running`` its ``cumsum(1)``.
        quota: ``int64 [S]``; more than the segment holds takes it all.

    Returns:
        ``bool [N]`` the picks, ties to the lower index; ``int64 [S]`` picks per segment.
    """
    num_segments, buckets = hist.shape
    quota = quota.minimum(running[:, -1])  # [S]
    edge = (running < quota[:, None]).sum(1, keepdim=True)  # [S, 1]: where the quota runs out
    edge_cell = edge.view(-1) + torch.arange(0, num_segments * buckets, buckets)  # [S]
    cell = comp >> (_KEY_BITS - _BUCKET_BITS)  # [N]: segment * H + bucket
    threshold = edge_cell.index_select(0, segment)  # [N]
    picked = cell < threshold
    index = torch.nonzero(cell == threshold, as_tuple=True)[0]  # [M], about N / H
    if index.numel():
        # A stable sort of (segment, key) puts each segment's candidates of its edge bucket
        # together, in key order, segments in order; the first of segment s sits at the count
        # of those of the segments before s, and quota - (those below the bucket) are picked:
        # sorted positions below limit[s].
        value, order = comp[index].sort(stable=True)
        upto = running.gather(1, edge).view(-1)  # [S]: up to and with the edge bucket
        limit = hist.gather(1, edge).view(-1).cumsum(0).sub_(upto).add_(quota)  # [S]
        chosen = torch.arange(value.numel()) < limit[value >> _KEY_BITS]
        picked[index[order[chosen]]] = True
    return picked, quota


def _smallest_per_segment(
    segment: Tensor, num_segments: int, quota: Tensor, key: Tensor
) -> tuple[Tensor, Tensor]:
    """``_pick`` from ``int64 [N]`` segments in ``[0, S)`` (-1: never picked) and ``int64 [N]``
    keys in ``[0, 2^31)``."""
    segment = torch.where(segment >= 0, segment, num_segments)  # S: the never picked
    comp = torch.add(key, segment, alpha=1 << _KEY_BITS)
    buckets = 1 << _BUCKET_BITS
    hist = torch.bincount(
        comp >> (_KEY_BITS - _BUCKET_BITS), minlength=(num_segments + 1) * buckets
    )
    hist = hist.view(num_segments + 1, buckets)  # [S + 1, H]
    quota = torch.cat([quota, quota.new_zeros(1)])
    picked, taken = _pick(segment, comp, hist, hist.cumsum(1), quota)
    return picked, taken[:-1]


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

    The draw changed on the CPU (issue 14), the distribution did not: every candidate falls in
    one segment of its image (an IoU bin, its ground truth, the floor group, or none), one
    histogram of (segment, the top bits of a random key) gives the counts, hence the quotas, and
    the picks (``_pick``); the top-ups draw a second key. So the picks for a given seed differ
    from earlier versions' and from the CUDA path's (``quota.draw`` per step, no host
    synchronisation); each is deterministic for a seeded generator.

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
    if not math.isfinite(iou.sum()):
        flat.check(check_finite, iou, "max_iou")
    if flat.device.type == "cpu":
        return flat.split(
            _sample_cpu(
                flat,
                iou,
                num=num,
                pos_fraction=pos_fraction,
                num_bins=num_bins,
                neg_thr=neg_thr,
                floor_thr=floor_thr,
                floor_fraction=floor_fraction,
                instance_balanced=instance_balanced,
                generator=generator,
            )
        )
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


def _sample_cpu(
    flat: FlatBatch,
    iou: Tensor,
    *,
    num: int,
    pos_fraction: float,
    num_bins: int,
    neg_thr: float,
    floor_thr: float,
    floor_fraction: float,
    instance_balanced: bool,
    generator: torch.Generator | None,
) -> Tensor:
    """``sample_iou_balanced`` on the CPU, where a host sync is free: ``bool [N]``.

    Every candidate falls in one segment of its image: an IoU bin, its ground truth (a
    positive), the floor group, or the ignored. One random 31-bit key per candidate ranks it in
    its segment; one histogram of (segment, the key's top bits) gives the counts, hence the
    quotas, and ``_pick`` the picks. A top-up ranks by a second key: what the bins leave of the
    first is not uniform across bins (each bin's leftovers lie above its own threshold).
    """
    n, num_images, k = flat.total, flat.num_images, num_bins
    if n == 0:
        return torch.zeros(0, dtype=torch.bool)
    label = flat.label
    num_gts = int(flat.gt_index.max()) + 1 if instance_balanced else 1
    # Segments per image: the bins, the ground truths, the floor group, the ignored.
    floor_at = k + num_gts
    width = floor_at + 2
    low = max(floor_thr, 0.0)
    # Clamped before the cast, which truncates: the floor of what is left (as a bin index).
    category = (iou - low if low else iou) / ((neg_thr - low) / k)
    category = category.clamp_(0, k - 1).long()  # [N]
    if floor_thr >= 0:
        category.masked_fill_(iou < floor_thr if floor_thr > 0 else iou <= 0, floor_at)
    category = torch.where(
        label == POSITIVE, flat.gt_index + k if instance_balanced else k, category
    )
    category.masked_fill_(label < 0, width - 1)
    key = torch.randint(1 << _KEY_BITS, (n,), generator=generator)  # [N]
    segment = category + _image_offsets(flat, width)  # [N]
    comp = torch.add(key, segment, alpha=1 << _KEY_BITS)  # [N]: (segment, key)
    buckets = 1 << _BUCKET_BITS
    cell = comp >> (_KEY_BITS - _BUCKET_BITS)  # [N]: (segment, bucket)
    hist = torch.bincount(cell, minlength=num_images * width * buckets).view(-1, buckets)
    running = hist.cumsum(1)  # [B * C, H]
    counts = running[:, -1].view(num_images, width)  # [B, C]
    pos_count = counts[:, k:floor_at].sum(1)  # [B]
    num_pos = pos_count.clamp(max=int(num * pos_fraction))  # [B]
    num_neg = counts[:, :k].sum(1).add_(counts[:, floor_at]).minimum(num - num_pos)  # [B]
    num_balanced = (num_neg * (1.0 - floor_fraction)).floor().long() if floor_fraction else num_neg
    pos_quota = (
        _round_robin(counts[:, k:floor_at], num_pos, int(num * pos_fraction), generator)
        if instance_balanced
        else num_pos[:, None]
    )
    none = torch.zeros_like(num_pos)[:, None].expand(-1, 2)  # the floor and the ignored
    quota = torch.cat([(num_balanced // k)[:, None].expand(-1, k), pos_quota, none], 1)
    picked, taken = _pick(segment, comp, hist, running, quota.view(-1))
    have = taken.view(num_images, width)[:, :k].sum(1)  # [B]: negatives picked
    # The top-ups, in order: the balanced ones to num_balanced, the floor to num_neg, any.
    steps = [("balanced", num_balanced)]
    if floor_thr >= 0:
        steps += [("floor", num_neg), ("negative", num_neg)]
    elif floor_fraction > 0:
        steps.append(("negative", num_neg))
    spare = None
    for group, target in steps:
        short = target - have  # [B]
        if int(short.max()) <= 0:
            continue
        if spare is None:
            spare = torch.randint(1 << _KEY_BITS, (n,), generator=generator)  # the second draw
        balanced, floor = category < k, category == floor_at
        eligible = {"balanced": balanced, "floor": floor, "negative": balanced | floor}[group]
        segment = torch.where(eligible & ~picked, flat.image, -1)
        more, got = _smallest_per_segment(segment, num_images, short.clamp_(min=0), spare)
        picked |= more
        have += got
    return picked


def _image_offsets(flat: FlatBatch, stride: int) -> Tensor:
    """``image * stride`` per candidate, ``int64 [N]``; cheaper when the images are of a size."""
    if len(set(flat.sizes)) == 1:
        return torch.arange(0, flat.num_images * stride, stride).repeat_interleave(flat.sizes[0])
    return flat.image * stride
