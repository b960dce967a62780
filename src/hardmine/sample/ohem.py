"""Online hard example mining: OHEM (Shrivastava et al., CVPR 2016)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from hardmine.boxes import check_boxes, check_finite, nms_first
from hardmine.sample.quota import flatten, take_top
from hardmine.structures import NEGATIVE, POSITIVE, Assignment, Selection, settings


@dataclass(frozen=True)
class OHEMSampler:
    """``sample_ohem`` as a ``Sampler``; its fields are the settings (see there).

    Needs the losses; ``generator`` is accepted for the interface and unused (deterministic).
    """

    num: int = 128
    nms_iou: float | None = 0.7
    pos_fraction: float | None = None
    needs_losses: ClassVar[bool] = True

    def __call__(
        self,
        boxes: Sequence[Tensor],
        assignments: Sequence[Assignment],
        *,
        losses: Sequence[Tensor] | None = None,
        mined: Sequence[Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> list[Selection]:
        if losses is None:
            raise ValueError("OHEMSampler needs per-candidate losses (losses=...), got None")
        return sample_ohem(boxes, assignments, losses, **settings(self))


def sample_ohem(
    boxes: Sequence[Tensor],
    assignments: Sequence[Assignment],
    losses: Sequence[Tensor],
    *,
    num: int = OHEMSampler.num,
    nms_iou: float | None = OHEMSampler.nms_iou,
    pos_fraction: float | None = OHEMSampler.pos_fraction,
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

    Example:
        Two near-duplicate hard negatives (IoU 0.91), the ground-truth copy and an easy
        negative; two picks: the hardest, not its duplicate, then the next hardest.

        >>> from hardmine import assign_max_iou
        >>> gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
        >>> boxes = [[20, 20, 30, 30], [20, 20, 30, 31], [0, 0, 10, 10], [40, 40, 50, 50]]
        >>> boxes = torch.tensor(boxes, dtype=torch.float32)
        >>> (a,) = assign_max_iou([boxes], [gt], [torch.tensor([1])])
        >>> losses = torch.tensor([2.0, 1.9, 0.5, 0.1])
        >>> sample_ohem([boxes], [a], [losses], num=2)[0].mask.tolist()
        [True, False, True, False]
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
