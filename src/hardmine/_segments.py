"""Counting and ranking within segments of a flat tensor, with no Python loop over segments.

A *segment* id groups entries of a flat batch: one per (image, group) for the samplers, one per
(image, ground truth) for instance-balanced positives, one per image for NMS. These two functions
are the only places that count and rank by segment; ``sample.quota``, ``boxes.nms_first`` and the
samplers build on them.
"""

from __future__ import annotations

import torch
from torch import Tensor


def count_per_segment(mask: Tensor, segment: Tensor, num_segments: int) -> Tensor:
    """How many ``mask`` entries fall in each segment: ``mask: bool [N]`` -> ``int64 [S]``.

    Entries with a negative segment are not counted. ``scatter_add`` into a fixed size instead of
    ``bincount``, whose output size would need a host sync on CUDA.
    """
    counts = torch.zeros(num_segments + 1, dtype=torch.int64, device=mask.device)
    seg = torch.where(mask & (segment >= 0), segment, num_segments)
    counts.scatter_add_(0, seg, torch.ones_like(seg))
    return counts[:num_segments]


def segment_rank(
    segment: Tensor, num_segments: int, keys: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Sort entries by segment, and within a segment by ``keys`` (descending), and rank them.

    Ties in ``keys`` (and every entry when ``keys`` is None) keep their index order, so the
    result is deterministic on every device.

    Args:
        segment: ``int64 [N]`` in ``[0, S)``.
        num_segments: ``S``.
        keys: ``float [N]``, or None to keep the index order within each segment.

    Returns:
        ``(order, rank, counts)``: ``order: int64 [N]`` the entries sorted by (segment, key);
        ``rank: int64 [N]`` the 0-based rank within its segment of the entry at ``order[i]``;
        ``counts: int64 [S]`` entries per segment.
    """
    n = segment.numel()
    if keys is None:
        order = torch.arange(n, device=segment.device)
    else:
        order = torch.argsort(keys, descending=True, stable=True)
    order = order[torch.argsort(segment[order], stable=True)]
    counts = count_per_segment(torch.ones_like(segment, dtype=torch.bool), segment, num_segments)
    starts = torch.cumsum(counts, 0) - counts  # [S]
    rank = torch.arange(n, device=segment.device) - starts[segment[order]]
    return order, rank, counts
