"""torchvision's FCOS trained with a hardmine assigner: FCOS + ATSS (Zhang et al., CVPR 2020).

The ATSS paper finds that how positives and negatives are defined, not whether a location holds
an anchor box or a point, separates RetinaNet from FCOS (Sec. 3), and trains both with ATSS
(Sec. 4); this module is the FCOS half, ``retinanet.py`` the RetinaNet one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.models.detection.fcos import FCOS

from hardmine.boxes import box_centers
from hardmine.models._dense import dense_forward
from hardmine.models._transform import target_boxes, with_box_keys
from hardmine.structures import IGNORE, Assigner, Assignment

#: The ATSS paper's anchor for the IoUs: one square of 8 times the stride per location.
ATSS_ANCHOR_SCALE = 8.0

# torchvision's FCOS matcher code for background; its head knows no code for "ignore".
_TV_BACKGROUND = -1
# A logit of certain background: its sigmoid is exactly 0 in every float type (float16 included),
# so the focal loss against a background target is exactly 0 and, being a constant, passes no
# gradient back.
_CERTAIN_BACKGROUND = -1e4


class AssignedFCOS(FCOS):
    """FCOS whose locations are labelled by a hardmine ``Assigner`` instead of its own rule.

    torchvision's rule (centre sampling within ``center_sampling_radius`` strides of a ground
    truth's centre, the location inside it, and a scale range per level) is replaced by the
    assigner's positives; the rest of FCOS's training is kept: its head's ``compute_loss``
    (sigmoid focal loss over every location, GIoU loss of the decoded boxes and centerness BCE
    over the positives, all normalised by the positives). Inference is FCOS's, untouched.

    Anchors for the assigner. FCOS's anchors are one square per location of the level's stride
    (``1 x stride``), and its box coder divides the regression targets by the anchor's size, so
    the model keeps them: changing them would rescale what the head learns and change inference.
    The assigner instead sees the same anchors scaled about their centres by ``anchor_scale``.
    The ATSS paper computes the IoUs of FCOS + ATSS with one ``8 x stride`` square anchor per
    location (the default, ``ATSS_ANCHOR_SCALE``): with ``1 x stride`` anchors the IoUs with most
    objects would be tiny and nearly equal, and the adaptive threshold (mean plus standard
    deviation of the candidates' IoUs) would select by anchor area rather than by fit. Ignore
    regions are judged on the scaled anchors too, as an anchor-based ATSS would judge its own.

    Ignore regions (``ignore_boxes`` in a target). torchvision's ``FCOSHead.compute_loss`` has no
    code for "ignore": every negative code, -2 included, becomes a background target of the focal
    loss. So the classification logits of ignored locations are replaced by a constant logit of
    certain background, whose focal loss is exactly 0 and which passes no gradient back. Ignored
    locations are never positives, so the box and centerness losses and the normaliser (the
    number of positives) never see them either.

    FCOS regresses distances from the location to the four sides of its ground truth (made
    non-negative by a ReLU), so it can learn only locations strictly inside their ground truth.
    A positive outside it (possible with a max-IoU assigner on scaled anchors, never with ATSS,
    whose positives lie inside by ``center_margin``) would give a negative centerness target and
    a NaN loss: such positives are ignored.

    Overrides ``forward`` in training mode only: torchvision's ``compute_loss`` does not receive
    the feature maps, and ATSS needs the number of locations per pyramid level, which they give.

    Args:
        model: the FCOS whose backbone, head, anchor generator, transform and inference settings
            to share (not copied).
        assigner: labels the locations, e.g. ``ATSSAssigner(topk=9)``.
        anchor_scale: the assigner's anchors are the model's scaled about their centres by this
            factor (the ATSS paper: 8).

    Raises:
        ValueError: ``anchor_scale`` is not positive.
    """

    def __init__(
        self, model: FCOS, *, assigner: Assigner, anchor_scale: float = ATSS_ANCHOR_SCALE
    ) -> None:
        if not anchor_scale > 0:
            raise ValueError(f"anchor_scale must be positive, got {anchor_scale}")
        super().__init__(
            model.backbone,
            model.head.classification_head.num_classes,
            anchor_generator=model.anchor_generator,
            head=model.head,
            center_sampling_radius=model.center_sampling_radius,
            score_thresh=model.score_thresh,
            nms_thresh=model.nms_thresh,
            detections_per_img=model.detections_per_img,
            topk_candidates=model.topk_candidates,
        )
        # Labels are 1-based (0: background), as the harness's num_classes + 1 has it.
        self.transform = with_box_keys(model.transform, model.head.classification_head.num_classes)
        self.assigner = assigner
        self.anchor_scale = anchor_scale

    def forward(
        self,
        images: list[Tensor],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """torchvision's signature: the losses in training mode, the detections in eval mode.

        Args:
            images: per image, ``[3, H, W]`` in [0, 1].
            targets: per image, ``boxes [G_i, 4]``, ``labels int64 [G_i]`` and optionally
                ``ignore_boxes [M_i, 4]``, regions whose locations are ignored.
        """
        if not self.training:
            return super().forward(images, targets)
        # One anchor per location: the anchors per level are the locations.
        targets, head_outputs, anchors, num_per_level = dense_forward(self, images, targets)
        gt_boxes = [t["boxes"] for t in targets]
        assignments = self.assigner(
            [scale_boxes(a, self.anchor_scale) for a in anchors],
            gt_boxes,
            [t["labels"] for t in targets],
            ignore_boxes=target_boxes(targets, "ignore_boxes", anchors[0]),
            num_per_level=num_per_level,
        )
        matched, ignored = to_fcos_matches(anchors, gt_boxes, assignments)
        cls_logits = head_outputs["cls_logits"].masked_fill(
            ignored[..., None], _CERTAIN_BACKGROUND
        )  # [B, N, C]
        head_outputs = {**head_outputs, "cls_logits": cls_logits}
        return self.head.compute_loss(targets, head_outputs, anchors, matched)


def scale_boxes(boxes: Tensor, factor: float) -> Tensor:
    """``boxes [N, 4]`` scaled about their centres by ``factor`` (widths and heights times it)."""
    centers = box_centers(boxes)  # [N, 2]
    half = (boxes[:, 2:] - boxes[:, :2]) * (factor / 2)  # [N, 2]
    return torch.cat([centers - half, centers + half], dim=1)


def to_fcos_matches(
    anchors: Sequence[Tensor], gt_boxes: Sequence[Tensor], assignments: Sequence[Assignment]
) -> tuple[list[Tensor], Tensor]:
    """The assignments as FCOS's head takes them, and which locations to leave out of its loss.

    Args:
        anchors: per image ``[N, 4]``, FCOS's anchors (their centres are the locations).
        gt_boxes: per image ``[G_i, 4]``.
        assignments: per image, of the ``N`` locations.

    Returns:
        Per image ``int64 [N]`` torchvision's matcher codes (the ground truth's index for a
        positive, -1 elsewhere), and ``bool [B, N]``: the ignored locations, those the assigner
        ignored and its positives that do not lie strictly inside their ground truth.
    """
    matched, ignored = [], []
    for anchors_i, gts, a in zip(anchors, gt_boxes, assignments, strict=True):
        if gts.shape[0] == 0:
            inside = torch.zeros_like(a.positive)
        else:
            centers = box_centers(anchors_i)  # [N, 2]
            gt = gts[a.gt_index]  # [N, 4]
            inside = ((centers > gt[:, :2]) & (centers < gt[:, 2:])).all(dim=1)
        positive = a.positive & inside
        matched.append(torch.where(positive, a.gt_index, _TV_BACKGROUND))
        ignored.append((a.label == IGNORE) | (a.positive & ~inside))
    return matched, torch.stack(ignored)
