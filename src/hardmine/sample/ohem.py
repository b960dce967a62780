"""Online hard example mining: OHEM (Shrivastava et al., CVPR 2016)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from hardmine.boxes import check_boxes, check_finite
from hardmine.sample.quota import flatten, take_top
from hardmine.structures import NEGATIVE, POSITIVE, Assignment, Selection


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
    suppress anything. One ``batched_nms`` call covers the batch, with the image (and, below, the
    pos/neg group) as the NMS class. Deterministic: equal losses go to the lower index.

    With ``pos_fraction``, MMDetection's ``OHEMSampler`` variant: positives and negatives are
    mined separately by loss, at most ``int(num * pos_fraction)`` positives and negatives making
    up the rest; NMS, if any, runs within each group so one group never suppresses the other.
    MMDetection has no NMS: pass ``nms_iou=None``.

    NMS output is data-dependent, so on CUDA this sampler synchronises once, inside torchvision.

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
        # Shift to non-negative coordinates: batched_nms separates classes by offsetting boxes by
        # class * (max coordinate + 1), which lets classes overlap when boxes leave the image.
        shifted = flat_boxes - flat_boxes.min()
        # The ignored form class -1 of their own, so they cannot suppress a pickable candidate.
        keep = batched_nms(shifted, loss, segment, nms_iou)
        survived = torch.zeros_like(kept)
        survived[keep] = True
        kept &= survived
    keys = torch.where(kept, loss, float("-inf"))

    if pos_fraction is None:
        quota = torch.full((flat.num_images, 1), num, dtype=torch.int64, device=flat.device)
    else:
        num_pos = flat.count(kept & pos).clamp(max=int(num * pos_fraction))  # [B]
        quota = torch.stack([num_pos, num - num_pos], dim=1)  # [B, 2]
    return flat.split(take_top(flat, keys, group, quota, max_quota=num))


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
