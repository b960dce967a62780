"""Online hard example mining: OHEM (Shrivastava et al., CVPR 2016)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from hardmine.boxes import box_iou, check_boxes, check_finite
from hardmine.sample.quota import count_per_segment, flatten, take_top
from hardmine.structures import NEGATIVE, POSITIVE, Assignment, Selection

# nms_first works on [S, M, M] tables; above this many cells it hands over to torchvision's NMS.
NMS_TABLE_CELLS = 2**24


def sample_ohem(
    boxes: Sequence[Tensor],
    assignments: Sequence[Assignment],
    losses: Sequence[Tensor],
    *,
    num: int = 128,
    nms_iou: float | None = 0.7,
    pos_fraction: float | None = None,
) -> list[Selection]:
    """Keep the ``num`` highest-loss candidates per image after removing near-duplicates.

    As the paper (section 4.2): NMS over the candidates scored by their loss at IoU ``nms_iou``
    (a candidate is suppressed by a higher-loss one overlapping it by more than that), then the
    ``num`` highest-loss survivors; no fg/bg ratio. Ignored candidates are never picked and never
    suppress anything. ``nms_first`` runs the NMS of every image (and, below, pos/neg group) at
    once and stops at the ``num``-th survivor. Deterministic: equal losses go to the lower index,
    in the NMS order too.

    With ``pos_fraction``, MMDetection's ``OHEMSampler`` variant: positives and negatives are
    mined separately by loss, at most ``int(num * pos_fraction)`` positives and negatives making
    up the rest; NMS, if any, runs within each group so one group never suppresses the other.
    MMDetection has no NMS: pass ``nms_iou=None``.

    NMS output is data-dependent, so on CUDA this sampler synchronises with the host (a few times
    per call, in ``nms_first``).

    Args:
        boxes: ``float [N_i, 4]`` candidates per image.
        assignments: one per image.
        losses: ``float [N_i]`` per-candidate losses from the read-only pass (classification plus
            box regression in the paper).
        num: picks per image (paper: 128 per image, batch of 2 images).
        nms_iou: NMS threshold (paper: 0.7); ``None`` disables NMS.
        pos_fraction: mine positives and negatives separately, at most this fraction positive.

    Returns:
        One ``Selection`` per image, weight 1 on the picks.

    Raises:
        ValueError: on non-finite boxes or losses, or sizes that disagree with the assignments.
    """
    flat = flatten(assignments)
    flat_boxes = flat.cat(boxes, "boxes")
    check_boxes(flat_boxes, "boxes")
    loss = flat.cat(losses, "losses")
    if loss.dim() != 1 or not loss.is_floating_point():
        raise ValueError(
            f"losses: expected floating [N_i] tensors, got {loss.dtype} {loss.dim()}-D"
        )
    check_finite(loss, "losses")
    pos, neg = flat.label == POSITIVE, flat.label == NEGATIVE
    if pos_fraction is None:
        num_groups, group = 1, torch.where(pos | neg, 0, -1)
    else:
        num_groups, group = 2, torch.where(pos, 0, torch.where(neg, 1, -1))
    segment = flat.segment(group, num_groups)  # [N], -1 for ignored

    kept = segment >= 0
    if nms_iou is not None and loss.numel():
        # The first ``num`` survivors of each segment are all the picks can use: in a group with
        # a quota under ``num`` (pos_fraction), the quota's best survivors are among them too.
        kept = nms_first(flat_boxes, loss, segment, flat.num_images * num_groups, nms_iou, num)
    keys = torch.where(kept, loss, float("-inf"))

    if pos_fraction is None:
        quota = torch.full((flat.num_images, 1), num, dtype=torch.int64, device=flat.device)
    else:
        num_pos = flat.count(kept & pos).clamp(max=int(num * pos_fraction))  # [B]
        quota = torch.stack([num_pos, num - num_pos], dim=1)  # [B, 2]
    return flat.split(take_top(flat, keys, group, quota, max_quota=num))


def nms_first(
    boxes: Tensor,
    scores: Tensor,
    segment: Tensor,
    num_segments: int,
    iou: float,
    k: int,
    *,
    max_cells: int | None = None,
) -> Tensor:
    """The first ``k`` survivors of greedy NMS in every segment, all segments at once.

    Greedy NMS visits the candidates by decreasing score (equal scores: lower index first) and
    keeps each one that no kept candidate overlaps by IoU > ``iou``. Its first ``k`` survivors
    depend only on the candidates up to the ``k``-th survivor, so this looks at a prefix of each
    segment's order, ``M`` long, grown fourfold until it holds ``k`` survivors (or the segment).
    In the prefix, from the pairwise IoUs ``[S, M, M]``, a candidate is settled as kept once every
    earlier candidate overlapping it is settled as suppressed, and as suppressed once one of them
    is kept. Each round settles at least the first unsettled candidate of every segment, so it
    ends; the number of rounds is the longest chain of overlaps, usually a handful. Beyond
    ``max_cells`` (default ``NMS_TABLE_CELLS``) table cells it runs torchvision's ``batched_nms``
    instead, which visits every candidate (same result, up to ties in score).

    Args:
        boxes: ``float [N, 4]``.
        scores: ``float [N]``, finite.
        segment: ``int64 [N]`` in ``[0, S)``; negative for candidates that take no part.
        num_segments: ``S``.
        iou: the suppression threshold.
        k: survivors wanted per segment.
        max_cells: see above.

    Returns:
        ``bool [N]``: each segment's first ``min(k, survivors)`` survivors.
    """
    n = scores.numel()
    out = torch.zeros(n, dtype=torch.bool, device=scores.device)
    usable = torch.nonzero(segment >= 0).flatten()
    if usable.numel() == 0 or k <= 0:
        return out
    seg = segment[usable]
    # By score, descending, lower index first; then stably by segment.
    order = torch.argsort(scores[usable], descending=True, stable=True)
    order = order[torch.argsort(seg[order], stable=True)]
    sorted_seg = seg[order]
    counts = count_per_segment(torch.ones_like(seg, dtype=torch.bool), seg, num_segments)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(order.numel(), device=seg.device) - starts[sorted_seg]
    longest = int(counts.max())
    length = min(longest, max(2 * k, 32))
    while True:
        if num_segments * length * length > (max_cells or NMS_TABLE_CELLS):
            return _nms_torchvision(boxes, scores, segment, iou, k, usable, out)
        kept, table = _nms_prefix(boxes[usable], order, sorted_seg, rank, num_segments, length, iou)
        found = kept.sum(1)  # [S]
        if length == longest or not bool(((found < k) & (counts > length)).any()):
            break
        length = min(longest, 4 * length)
    first = kept & (kept.cumsum(1) <= k)
    return out.index_fill_(0, usable[table[first]], True)


def _nms_prefix(
    boxes: Tensor,
    order: Tensor,
    sorted_seg: Tensor,
    rank: Tensor,
    num_segments: int,
    length: int,
    iou: float,
) -> tuple[Tensor, Tensor]:
    """Greedy NMS on the first ``length`` candidates of each segment (see ``nms_first``).

    Returns:
        ``(kept bool [S, M], table int64 [S, M])``: the survivors, and which candidate (an index
        into ``boxes``) each cell holds; empty cells hold 0 and are never kept.
    """
    inside = rank < length
    table = torch.full((num_segments, length), -1, dtype=torch.int64, device=boxes.device)
    table[sorted_seg[inside], rank[inside]] = order[inside]
    valid = table >= 0
    table.clamp_(min=0)
    cand = boxes[table]  # [S, M, 4]
    earlier = torch.ones(length, length, dtype=torch.bool, device=boxes.device).tril_(-1)
    # overlaps[s, i, j]: earlier candidate j would suppress i if kept.
    overlaps = (box_iou(cand, cand) > iou) & earlier & valid[:, None, :]
    kept = torch.zeros_like(valid)
    settled = ~valid
    while not bool(settled.all()):
        suppressed = (overlaps & kept[:, None, :]).any(2)
        open_blocker = (overlaps & ~settled[:, None, :]).any(2)
        kept = valid & ~suppressed & ~open_blocker
        settled = ~valid | kept | suppressed
    return kept, table


def _nms_torchvision(
    boxes: Tensor,
    scores: Tensor,
    segment: Tensor,
    iou: float,
    k: int,
    usable: Tensor,
    out: Tensor,
) -> Tensor:
    """``nms_first`` by torchvision's ``batched_nms`` over all usable candidates."""
    # Shift to non-negative coordinates: batched_nms separates classes by offsetting boxes by
    # class * (max coordinate + 1), which lets classes overlap when boxes leave the image.
    b = boxes[usable]
    keep = usable[batched_nms(b - b.min(), scores[usable], segment[usable], iou)]
    # keep is by decreasing score; the first k of each segment.
    seg = segment[keep]
    order = torch.argsort(seg, stable=True)
    counts = torch.bincount(seg, minlength=int(seg.max()) + 1 if seg.numel() else 0)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device) - starts[seg[order]]
    return out.index_fill_(0, keep[rank < k], True)


@dataclass(frozen=True)
class OHEMSampler:
    """``sample_ohem`` with its settings, in the ``Sampler`` interface; needs the losses."""

    num: int = 128
    nms_iou: float | None = 0.7
    pos_fraction: float | None = None
    needs_losses: bool = True

    def __call__(
        self,
        boxes: Sequence[Tensor],
        assignments: Sequence[Assignment],
        *,
        losses: Sequence[Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> list[Selection]:
        """Pick by loss; ``generator`` is accepted for the interface and unused (deterministic)."""
        if losses is None:
            raise ValueError("OHEMSampler needs per-candidate losses (losses=...), got None")
        return sample_ohem(
            boxes,
            assignments,
            losses,
            num=self.num,
            nms_iou=self.nms_iou,
            pos_fraction=self.pos_fraction,
        )
