"""Online hard example mining: OHEM (Shrivastava et al., "Training Region-based Object Detectors
with Online Hard Example Mining", CVPR 2016; ``papers/ohem_shrivastava_cvpr2016.txt``).

The sampler ranks losses it is given; the read-only pass that computes them is
``hardmine.models.read_only.score_rois`` (Sec. 4.2's read-only RoI network).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from hardmine.boxes import check_boxes, check_finite, nms_first
from hardmine.sample.quota import check_call, flatten, take_top
from hardmine.structures import NEGATIVE, POSITIVE, Assignment, Selection, check_fields, settings


@dataclass(frozen=True)
class OHEMSampler:
    """``sample_ohem`` as a ``Sampler``; its fields are the settings (see there).

    Needs the losses; ``generator`` is accepted for the interface and unused (deterministic).
    The defaults are the paper's: 64 RoIs per image (B = 128 over N = 2 images), NMS at 0.7, no
    fg:bg ratio.
    """

    num: int = 64
    nms_iou: float | None = 0.7
    pos_fraction: float | None = None
    needs_losses: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_fields(self)
        check_ohem_settings(num=self.num, nms_iou=self.nms_iou, pos_fraction=self.pos_fraction)

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
        if losses is None:
            raise ValueError("OHEMSampler needs per-candidate losses (losses=...), got None")
        return sample_ohem(boxes, assignments, losses, **settings(self))


def check_ohem_settings(*, num: int, nms_iou: float | None, pos_fraction: float | None) -> None:
    """Raise ``ValueError`` naming the first setting of ``sample_ohem`` out of its range."""
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if nms_iou is not None and not 0.0 <= nms_iou <= 1.0:
        raise ValueError(f"nms_iou must be in [0, 1] or None, got {nms_iou}")
    if pos_fraction is not None and not 0.0 <= pos_fraction <= 1.0:
        raise ValueError(f"pos_fraction must be in [0, 1] or None, got {pos_fraction}")


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

    As the paper, Sec. 4.1: "Hard examples are selected by sorting the input RoIs by loss and
    taking the B/N examples for which the current network performs worst", after deduplication
    by "standard non-maximum suppression (NMS) ... Given a list of RoIs and their losses, NMS
    works by iteratively selecting the RoI with the highest loss, and then removing all lower loss
    RoIs that have high overlap with the selected region. We use a relaxed IoU threshold of
    0.7". So: NMS over the candidates scored by their loss at IoU ``nms_iou`` (a candidate is
    suppressed by a higher-loss one overlapping it by more than that), then the ``num``
    highest-loss survivors, with no fg:bg ratio ("the procedure described above does not need a
    fg-bg ratio for data balancing"). Ignored candidates are never picked and never suppress
    anything (with the paper's labelling, fg IoU >= 0.5 and bg in [0, 0.5) since OHEM removes
    bg_lo, there are none). ``nms_first`` runs the NMS of every image (and, below, pos/neg
    group) at once and stops at the ``num``-th survivor. Deterministic: equal losses go to the
    lower index, in the NMS order too.

    ``num`` is per image: the paper's batch is B = 128 RoIs over N = 2 images (Sec. 3.1, "N = 2
    and B = 128 works well in practice"; Sec. 4.2 runs one image per forward-backward pass), so
    64 per image; Table 1's N = 1 rows take 128 from their one image.

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
            box regression in the paper: Fast R-CNN's loss, Sec. 3.1).
        num: picks per image (paper: B / N = 128 / 2 = 64).
        nms_iou: NMS threshold (paper: 0.7); ``None`` disables NMS.
        pos_fraction: mine positives and negatives separately, at most this fraction positive.

    Returns:
        One ``Selection`` per image, weight 1 on the picks.

    Raises:
        ValueError: on non-finite boxes or losses, sizes that disagree with the assignments, or
            settings out of range.

    Example:
        Two near-duplicate hard negatives (IoU 0.91), the ground-truth copy and an easy
        negative; two picks: the hardest, not its duplicate, then the next hardest.

        >>> import torch
        >>> from hardmine.sample.ohem import sample_ohem
        >>> from hardmine import assign_max_iou
        >>> gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
        >>> boxes = [[20, 20, 30, 30], [20, 20, 30, 31], [0, 0, 10, 10], [40, 40, 50, 50]]
        >>> boxes = torch.tensor(boxes, dtype=torch.float32)
        >>> (a,) = assign_max_iou([boxes], [gt], [torch.tensor([1])])
        >>> losses = torch.tensor([2.0, 1.9, 0.5, 0.1])
        >>> sample_ohem([boxes], [a], [losses], num=2)[0].mask.tolist()
        [True, False, True, False]
    """
    check_ohem_settings(num=num, nms_iou=nms_iou, pos_fraction=pos_fraction)
    flat = flatten(assignments)
    flat_boxes = flat.cat(boxes, "boxes")
    flat.check(check_boxes, flat_boxes, "boxes")
    loss = flat.cat(losses, "losses")
    if loss.dim() != 1 or not loss.is_floating_point():
        raise ValueError(
            f"losses: expected floating [N_i] tensors, got {loss.dtype} {loss.dim()}-D"
        )
    flat.check(check_finite, loss, "losses")
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
