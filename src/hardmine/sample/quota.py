"""The one sampling mechanism: quotas per (image, group) segment of a flat batch.

Every sampler in hardmine says how it splits candidates into groups, how it weights or scores them,
and how many each group gets; this module does the picking, for all images of a batch at once, with
no Python loop over images or groups and no host synchronisation (DESIGN.md, "One sampling
mechanism").

A *flat batch* concatenates the candidates of all images. ``segment[i]`` names the group that
candidate ``i`` belongs to (usually ``image * num_groups + group``), or is negative when the
candidate may not be picked at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from hardmine._segments import count_per_segment, segment_rank
from hardmine.structures import Assignment, Selection


@dataclass(frozen=True)
class FlatBatch:
    """The assignments of a batch concatenated, with each candidate's image index.

    Attributes:
        label, gt_index, max_iou, gt_class: the ``Assignment`` fields, concatenated, ``[N]``.
        image: ``int64 [N]``: which image each candidate belongs to.
        position: ``int64 [N]``: each candidate's index within its image.
        starts: ``int64 [B]``: where each image's candidates begin.
        sizes: candidates per image (host ints: known from the shapes, no sync).
    """

    label: Tensor
    gt_index: Tensor
    max_iou: Tensor
    gt_class: Tensor
    image: Tensor
    position: Tensor
    starts: Tensor
    sizes: list[int]

    @property
    def max_size(self) -> int:
        """Candidates in the largest image."""
        return max(self.sizes)

    @property
    def num_images(self) -> int:
        return len(self.sizes)

    @property
    def device(self) -> torch.device:
        return self.label.device

    def segment(self, group: Tensor, num_groups: int) -> Tensor:
        """``image * num_groups + group`` where ``group >= 0``, else -1: ``int64 [N]``."""
        return torch.where(group >= 0, self.image * num_groups + group, -1)

    def count(self, mask: Tensor) -> Tensor:
        """``mask`` entries per image: ``int64 [B]``."""
        return count_per_segment(mask, self.image, self.num_images)

    def per_image(self, values: Tensor) -> Tensor:
        """Broadcast a per-image ``[B]`` tensor to the candidates: ``[N]``."""
        return values[self.image]

    def cat(self, values: Sequence[Tensor], name: str) -> Tensor:
        """Concatenate per-image ``values`` (boxes ``[N_i, 4]``, losses ``[N_i]``) in batch order.

        Raises:
            ValueError: if the number of images or any image's ``N_i`` disagrees with the batch.
        """
        if len(values) != self.num_images:
            raise ValueError(f"{name}: got {len(values)} images, expected {self.num_images}")
        for i, (v, n) in enumerate(zip(values, self.sizes, strict=True)):
            if v.shape[0] != n:
                raise ValueError(f"{name}[{i}]: got {v.shape[0]} rows, expected {n} candidates")
        return torch.cat(list(values))

    def split(self, mask: Tensor, weight: Tensor | None = None) -> list[Selection]:
        """Cut flat ``mask`` / ``weight`` back into one ``Selection`` per image."""
        if weight is None:
            weight = mask.to(self.max_iou.dtype)
        return [
            Selection(mask=m, weight=w)
            for m, w in zip(mask.split(self.sizes), weight.split(self.sizes), strict=True)
        ]


def flatten(assignments: Sequence[Assignment]) -> FlatBatch:
    """Concatenate per-image assignments into a ``FlatBatch``."""
    if len(assignments) == 0:
        raise ValueError("expected at least one image's assignment, got an empty batch")
    sizes = [a.num_candidates for a in assignments]
    device = assignments[0].label.device
    total = sum(sizes)
    counts = torch.tensor(sizes, device=device)
    starts = counts.cumsum(0) - counts  # [B]
    # output_size spares CUDA the sync that sizing the result from a device tensor would need.
    image = torch.repeat_interleave(
        torch.arange(len(sizes), device=device), counts, output_size=total
    )
    start_of = torch.repeat_interleave(starts, counts, output_size=total)
    return FlatBatch(
        label=torch.cat([a.label for a in assignments]),
        gt_index=torch.cat([a.gt_index for a in assignments]),
        max_iou=torch.cat([a.max_iou for a in assignments]),
        gt_class=torch.cat([a.gt_class for a in assignments]),
        image=image,
        position=torch.arange(total, device=device) - start_of,
        starts=starts,
        sizes=sizes,
    )


_NEVER = torch.iinfo(torch.int64).min
_ALWAYS = torch.iinfo(torch.int64).max


def _ranking_keys(keys: Tensor, position: Tensor) -> Tensor:
    """``float [N]`` keys -> ``int64 [N]`` keys in the same order, unique within an image.

    The float's bits become an order-preserving integer (flip all but the sign bit of negatives)
    in the high 32 bits; the low 32 bits prefer the lower position. So ties go to the lower index,
    exactly and on every device, which a float ``topk`` does not promise.
    """
    bits = keys.to(torch.float32).contiguous().view(torch.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed-int order == float order
    return ordered.to(torch.int64) * (1 << 32) + ((1 << 32) - 1 - position)


def take_top(
    flat: FlatBatch,
    keys: Tensor,
    group: Tensor,
    quota: Tensor,
    *,
    max_quota: int | None = None,
) -> Tensor:
    """In every image and group, pick the ``quota`` candidates with the largest keys.

    The batch becomes a table with one row per (image, group) and one column per position in the
    image, ``[B * G, N_max]``, and one ``topk`` over its rows picks for every image and group at
    once. Each row also gets ``k - quota`` entries that beat every key, so an unsorted ``topk(k)``
    (a linear-time selection, no sort of the flat batch nor of the picks) returns exactly the
    row's ``quota`` best candidates beside them. ``k`` is ``max_quota``, so the work is about
    ``G * (N + B * max_quota)``.

    Args:
        flat: the batch.
        keys: ``float [N]``; ``-inf`` is never picked.
        group: ``int64 [N]`` in ``[0, G)``, negative for candidates that may not be picked.
        quota: ``int64 [B, G]``: how many to pick per image and group (more than the group holds
            takes all).
        max_quota: a bound on ``quota`` known on the host (e.g. ``num``); tighter is faster.
            Defaults to the longest image.

    Returns:
        ``bool [N]``. Ties go to the lower index, so the result is deterministic.
    """
    usable = (group >= 0) & (keys > float("-inf"))
    ranked = torch.where(usable, _ranking_keys(keys, flat.position), _NEVER)
    return _take_ranked(flat, ranked, group, quota, max_quota)


def _take_ranked(
    flat: FlatBatch, ranked: Tensor, group: Tensor, quota: Tensor, max_quota: int | None
) -> Tensor:
    """``take_top`` on ``int64`` keys unique within each image; ``_NEVER`` is never taken."""
    num_groups = quota.shape[1]
    n, length = ranked.numel(), flat.max_size
    k = length if max_quota is None else min(max_quota, length)
    if n == 0 or k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=ranked.device)
    rows, width = flat.num_images * num_groups, length + k
    table = torch.full((rows, width), _NEVER, device=ranked.device)  # [B * G, N_max + k]
    # Each cell (image, g, position) has one owner, the candidate at that position, so the
    # unusable writing _NEVER into their group-0 row clobbers nobody.
    cell = (flat.image * num_groups + group.clamp(min=0)) * width + flat.position
    table.view(-1).scatter_(0, cell, ranked)
    rank = torch.arange(k, device=ranked.device)
    spare = k - quota.reshape(-1, 1).clamp(0, k)  # [B * G, 1]
    table[:, length:] = torch.where(rank < spare, _ALWAYS, _NEVER)
    values, cols = table.topk(k, dim=1, sorted=False)  # [B * G, k]
    take = (cols < length) & (values > _NEVER)
    row_start = flat.starts.repeat_interleave(num_groups)  # [B * G]
    index = torch.where(take, row_start[:, None] + cols, n)  # n: a spare slot for the unpicked
    mask = torch.zeros(n + 1, dtype=torch.bool, device=ranked.device)
    return mask.scatter_(0, index.flatten(), True)[:n]


def random_keys(
    weight: Tensor | None,
    *,
    like: Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Random keys whose top k are a draw without replacement.

    Uniform (``weight=None``): the keys are ``u ~ U[0, 1)``. Weighted: Efraimidis–Spirakis keys
    ``log(u) / w = -E / w`` with ``E ~ Exp(1)``; weight 0 gives ``-inf`` (never drawn).

    Args:
        weight: ``float [N] >= 0``, or ``None`` for uniform.
        like: a ``[N]`` tensor giving the size and device.
        generator: makes the keys reproducible.

    Returns:
        ``float32 [N]``.
    """
    if weight is None:
        return torch.rand(like.shape, generator=generator, device=like.device)
    e = torch.empty(like.shape, device=like.device).exponential_(generator=generator)
    w = weight.to(torch.float32)
    return torch.where(w > 0, -e / w, float("-inf"))


def draw(
    flat: FlatBatch,
    weight: Tensor | None,
    group: Tensor,
    quota: Tensor,
    *,
    max_quota: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw without replacement ``quota[b, g]`` candidates per image and group.

    Args:
        flat: the batch.
        weight: ``float [N] >= 0``, pick probability proportional to it (0 is never drawn), or
            ``None`` for a uniform draw.
        group: ``int64 [N]`` in ``[0, G)``, negative for candidates that may not be drawn.
        quota: ``int64 [B, G]``.
        max_quota: a host bound on ``quota`` (see ``take_top``).
        generator: makes the draw reproducible; must live on the batch's device.

    Returns:
        ``bool [N]``.
    """
    if weight is None:
        # Random 62-bit integers rank a uniform draw directly: no float keys to convert, and
        # ties, which only the tie-break could decide, have probability about N^2 / 2^63.
        ranked = torch.randint(
            1 << 62, flat.image.shape, generator=generator, device=flat.image.device
        )
        return _take_ranked(flat, torch.where(group >= 0, ranked, _NEVER), group, quota, max_quota)
    keys = random_keys(weight, like=flat.max_iou, generator=generator)
    return take_top(flat, keys, group, quota, max_quota=max_quota)


def take_top_in_segments(keys: Tensor, segment: Tensor, quota: Tensor) -> Tensor:
    """``take_top`` for segments that are not (image, group) pairs, e.g. one per ground truth.

    Sorts, so it costs ``N log N`` in the usable candidates: on the CPU, where a host sync is
    free, it first drops the unusable ones (usually most: it serves the positives).

    Args:
        keys: ``float [N]``; ``-inf`` is never picked.
        segment: ``int64 [N]`` in ``[0, S)``, or negative for candidates that may not be picked.
        quota: ``int64 [S]``.

    Returns:
        ``bool [N]``. Ties go to the lower index.
    """
    n, num_segments = keys.numel(), quota.numel()
    usable = (segment >= 0) & (keys > float("-inf"))
    if keys.device.type == "cpu":
        index = torch.nonzero(usable).flatten()
        picked = _take_top_sorted(keys[index], segment[index], quota, num_segments)
        return torch.zeros(n, dtype=torch.bool).index_put_((index,), picked)
    seg = torch.where(usable, segment, num_segments)  # the unusable go to an overflow segment
    return _take_top_sorted(keys, seg, quota, num_segments)


def _take_top_sorted(keys: Tensor, seg: Tensor, quota: Tensor, num_segments: int) -> Tensor:
    n = keys.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.bool, device=keys.device)
    # seg may hold the overflow segment num_segments, whose quota is 0.
    order, rank, _ = segment_rank(seg, num_segments + 1, keys)
    sorted_seg = seg[order]
    quota_ext = torch.cat([quota.to(torch.int64), quota.new_zeros(1, dtype=torch.int64)])
    mask = torch.zeros(n, dtype=torch.bool, device=keys.device)
    mask[order] = rank < quota_ext[sorted_seg]
    return mask


def segment_by_key(image: Tensor, key: Tensor, mask: Tensor) -> Tensor:
    """One segment per distinct ``(image, key)`` pair among the ``mask`` candidates.

    Groups whose number is data-dependent (one per ground truth) get dense ids without a host
    sync: sort by ``(image, key)`` and number the runs. The ids are ordered by ``(image, key)``.
    On the CPU, where a sync is free, only the ``mask`` candidates are sorted.

    Args:
        image: ``int64 [N]``.
        key: ``int64 [N]``, e.g. ``gt_index``.
        mask: ``bool [N]``, the candidates to group.

    Returns:
        ``int64 [N]``: ids in ``[0, N)`` where ``mask``, -1 elsewhere; ``N`` segments suffice.
    """
    if key.device.type == "cpu":
        index = torch.nonzero(mask).flatten()
        segment = torch.full_like(key, -1)
        segment[index] = _number_runs(image[index], key[index], torch.ones_like(index, dtype=bool))
        return segment
    return _number_runs(image, key, mask)


def _number_runs(image: Tensor, key: Tensor, mask: Tensor) -> Tensor:
    n = key.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=key.device)
    order = torch.argsort(key, stable=True)
    order = order[torch.argsort(image[order], stable=True)]
    order = order[torch.argsort(~mask[order], stable=True)]  # the masked ones first
    img, k, m = image[order], key[order], mask[order]
    new_run = m.clone()
    new_run[1:] &= (img[1:] != img[:-1]) | (k[1:] != k[:-1])
    segment = torch.empty_like(order)
    segment[order] = torch.where(m, torch.cumsum(new_run, 0) - 1, -1)
    return segment


def fill_shortfall(
    flat: FlatBatch,
    picked: Tensor,
    eligible: Tensor,
    target: Tensor,
    *,
    weight: Tensor | None = None,
    max_quota: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Top up each image to ``target`` picks from the ``eligible`` candidates not yet picked.

    Args:
        flat: the batch.
        picked: ``bool [N]``, the picks so far (all of them count against ``target``).
        eligible: ``bool [N]``, the fallback group.
        target: ``int64 [B]``, the wanted number of picks per image.
        weight: ``float [N]`` draw weights for the fallback (uniform by default).
        max_quota: a host bound on ``target`` (see ``take_top``).
        generator: makes the draw reproducible.

    Returns:
        ``bool [N]``: ``picked`` plus the top-up.
    """
    shortfall = (target - flat.count(picked)).clamp(min=0)
    group = torch.where(eligible & ~picked, 0, -1)
    top_up = draw(flat, weight, group, shortfall[:, None], max_quota=max_quota, generator=generator)
    return picked | top_up
