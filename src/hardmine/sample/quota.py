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

from hardmine.structures import Assignment, Selection


def count_per_segment(mask: Tensor, segment: Tensor, num_segments: int) -> Tensor:
    """How many ``mask`` entries fall in each segment: ``mask: bool [N]`` -> ``int64 [S]``.

    ``scatter_add`` into a fixed size instead of ``bincount``, whose output size would need a sync.
    """
    counts = torch.zeros(num_segments + 1, dtype=torch.int64, device=mask.device)
    seg = torch.where(mask & (segment >= 0), segment, num_segments)
    counts.scatter_add_(0, seg, torch.ones_like(seg))
    return counts[:num_segments]


def take_top(keys: Tensor, segment: Tensor, quota: Tensor) -> Tensor:
    """In every segment, pick the ``quota`` candidates with the largest keys.

    Args:
        keys: ``float [N]``; ``-inf`` is never picked.
        segment: ``int64 [N]`` in ``[0, S)``, or negative for candidates that may not be picked.
        quota: ``int64 [S]``: how many to pick per segment (more than the segment holds takes all).

    Returns:
        ``bool [N]``. Ties go to the lower index (stable sort), so the result is deterministic.
    """
    n, num_segments = keys.numel(), quota.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.bool, device=keys.device)
    usable = (segment >= 0) & (keys > float("-inf"))
    seg = torch.where(usable, segment, num_segments)  # the unusable go to an overflow segment
    # Sort by key (descending), then stably by segment: keys stay descending within each segment.
    order = torch.argsort(keys, descending=True, stable=True)
    order = order[torch.argsort(seg[order], stable=True)]
    sorted_seg = seg[order]
    counts = torch.zeros(num_segments + 1, dtype=torch.int64, device=keys.device)
    counts.scatter_add_(0, seg, torch.ones_like(seg))
    starts = torch.cumsum(counts, 0) - counts  # [S + 1]
    rank = torch.arange(n, device=keys.device) - starts[sorted_seg]
    quota_ext = torch.cat([quota.to(torch.int64), quota.new_zeros(1, dtype=torch.int64)])
    mask = torch.zeros(n, dtype=torch.bool, device=keys.device)
    mask[order] = rank < quota_ext[sorted_seg]
    return mask


def random_keys(weight: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """Efraimidis–Spirakis keys ``log(u) / w``: the top k are a weighted draw without replacement.

    ``weight: float [N] >= 0``; weight 0 gives ``-inf`` (never drawn). Uniform weights give a
    uniform draw.
    """
    u = torch.rand(weight.shape, generator=generator, device=weight.device, dtype=torch.float64)
    return u.clamp_min(torch.finfo(torch.float64).tiny).log() / weight.to(torch.float64)


def draw(
    weight: Tensor,
    segment: Tensor,
    quota: Tensor,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Weighted draw without replacement of ``quota[s]`` candidates in each segment ``s``.

    Args:
        weight: ``float [N] >= 0``, pick probability proportional to it; 0 is never drawn.
        segment: ``int64 [N]``, negative for candidates that may not be drawn.
        quota: ``int64 [S]``.
        generator: makes the draw reproducible; must live on ``weight``'s device.

    Returns:
        ``bool [N]``.
    """
    return take_top(random_keys(weight, generator=generator), segment, quota)


@dataclass(frozen=True)
class FlatBatch:
    """The assignments of a batch concatenated, with each candidate's image index.

    Attributes:
        label, gt_index, max_iou, gt_class: the ``Assignment`` fields, concatenated, ``[N]``.
        image: ``int64 [N]``: which image each candidate belongs to.
        sizes: candidates per image (host ints: known from the shapes, no sync).
    """

    label: Tensor
    gt_index: Tensor
    max_iou: Tensor
    gt_class: Tensor
    image: Tensor
    sizes: list[int]

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
    # output_size spares CUDA the sync that sizing the result from a device tensor would need.
    image = torch.repeat_interleave(
        torch.arange(len(sizes), device=device),
        torch.tensor(sizes, device=device),
        output_size=sum(sizes),
    )
    return FlatBatch(
        label=torch.cat([a.label for a in assignments]),
        gt_index=torch.cat([a.gt_index for a in assignments]),
        max_iou=torch.cat([a.max_iou for a in assignments]),
        gt_class=torch.cat([a.gt_class for a in assignments]),
        image=image,
        sizes=sizes,
    )


def segment_by_key(image: Tensor, key: Tensor, mask: Tensor) -> Tensor:
    """One segment per distinct ``(image, key)`` pair among the ``mask`` candidates.

    Groups whose number is data-dependent (one per ground truth) get dense ids without a host
    sync: sort by ``(image, key)`` and number the runs. The ids are ordered by ``(image, key)``.

    Args:
        image: ``int64 [N]``.
        key: ``int64 [N]``, e.g. ``gt_index``.
        mask: ``bool [N]``, the candidates to group.

    Returns:
        ``int64 [N]``: ids in ``[0, N)`` where ``mask``, -1 elsewhere; ``N`` segments suffice.
    """
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
    generator: torch.Generator | None = None,
) -> Tensor:
    """Top up each image to ``target`` picks from the ``eligible`` candidates not yet picked.

    Args:
        flat: the batch.
        picked: ``bool [N]``, the picks so far (all of them count against ``target``).
        eligible: ``bool [N]``, the fallback group.
        target: ``int64 [B]``, the wanted number of picks per image.
        weight: ``float [N]`` draw weights for the fallback (uniform by default).

    Returns:
        ``bool [N]``: ``picked`` plus the top-up.
    """
    shortfall = (target - flat.count(picked)).clamp(min=0)
    pool = eligible & ~picked
    segment = torch.where(pool, flat.image, -1)
    if weight is None:
        weight = torch.ones_like(flat.max_iou)
    return picked | draw(weight, segment, shortfall, generator=generator)
