"""torchvision's RetinaNet trained with a hardmine assigner (ATSS: Zhang et al., CVPR 2020), and
``with_assigner``, which wraps a RetinaNet or an FCOS (``hardmine.models.fcos``)."""

from __future__ import annotations

import dataclasses
from typing import Any, overload

import torch
from torch import Tensor
from torchvision.models.detection.fcos import FCOS
from torchvision.models.detection.retinanet import RetinaNet

from hardmine.models._checks import require_component
from hardmine.models._dense import dense_forward
from hardmine.models._transform import target_boxes, with_box_keys
from hardmine.models.fcos import ATSS_ANCHOR_SCALE, AssignedFCOS
from hardmine.structures import Assigner, Assignment

# torchvision's RetinaNet head marks ignored anchors with its matcher's codes.
_TV_NEGATIVE, _TV_IGNORE = -1, -2


class AssignedRetinaNet(RetinaNet):
    """RetinaNet whose anchors are labelled by a hardmine ``Assigner`` instead of its IoU matcher.

    The rest of RetinaNet's training is kept: its head's ``compute_loss`` (sigmoid focal loss over
    positives and negatives, ignored anchors excluded, normalised by the positives; the box loss
    the regression head is configured with, L1 or GIoU). Inference is RetinaNet's, untouched.

    Overrides ``forward`` in training mode only: torchvision's ``compute_loss`` does not receive the
    feature maps, and ATSS needs the number of anchors per pyramid level, which they give.

    Args:
        model: the RetinaNet whose backbone, head, anchor generator, transform and inference
            settings to share (not copied).
        assigner: labels the anchors, e.g. ``ATSSAssigner(topk=9)``.
    """

    def __init__(self, model: RetinaNet, *, assigner: Assigner) -> None:
        super().__init__(
            model.backbone,
            model.head.classification_head.num_classes,
            anchor_generator=model.anchor_generator,
            head=model.head,
            proposal_matcher=model.proposal_matcher,
            score_thresh=model.score_thresh,
            nms_thresh=model.nms_thresh,
            detections_per_img=model.detections_per_img,
            topk_candidates=model.topk_candidates,
        )
        # Labels are 1-based (0: background), as the harness's num_classes + 1 has it.
        self.transform = with_box_keys(model.transform, model.head.classification_head.num_classes)
        self.assigner = assigner

    def forward(
        self,
        images: list[Tensor],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """torchvision's signature: the losses in training mode, the detections in eval mode.

        Args:
            images: per image, ``[3, H, W]`` in [0, 1].
            targets: per image, ``boxes [G_i, 4]``, ``labels int64 [G_i]`` and optionally
                ``ignore_boxes [M_i, 4]``, regions whose anchors are ignored.
        """
        if not self.training:
            return super().forward(images, targets)
        targets, head_outputs, anchors, locations = dense_forward(self, images, targets)
        per_location = self.anchor_generator.num_anchors_per_location()
        num_per_level = [n * a for n, a in zip(locations, per_location, strict=True)]
        assignments = self.assigner(
            anchors,
            [t["boxes"] for t in targets],
            [t["labels"] for t in targets],
            ignore_boxes=target_boxes(targets, "ignore_boxes", anchors[0]),
            num_per_level=num_per_level,
        )
        matched = [_torchvision_matches(a) for a in assignments]
        return self.head.compute_loss(targets, head_outputs, anchors, matched)


def _torchvision_matches(assignment: Assignment) -> Tensor:
    """An ``Assignment`` in torchvision's matcher codes: ``int64 [N]``, gt index, -1 or -2."""
    codes = torch.where(assignment.negative, _TV_NEGATIVE, _TV_IGNORE)
    return torch.where(assignment.positive, assignment.gt_index, codes)


def fit_anchors_per_location(assigner: Any, expected: int) -> Any:
    """``assigner`` with ``anchors_per_location = expected`` if it left that field at its default.

    Looks through wrappers that hold the assigner in a dataclass field ``assigner`` (such as the
    harness's counting one). An assigner without the field is returned as it is.

    Raises:
        ValueError: the field was set to another count than ``expected``.
    """
    if not dataclasses.is_dataclass(assigner) or isinstance(assigner, type):
        return assigner
    fields = {f.name: f for f in dataclasses.fields(assigner)}
    if "anchors_per_location" in fields:
        given = assigner.anchors_per_location
        if given == expected:
            return assigner
        if given == fields["anchors_per_location"].default:
            return dataclasses.replace(assigner, anchors_per_location=expected)
        raise ValueError(
            f"{type(assigner).__name__}(anchors_per_location={given}) but the model's anchor "
            f"generator has {expected} anchors per location; pass anchors_per_location={expected} "
            "or leave it out"
        )
    if "assigner" in fields:
        inner = fit_anchors_per_location(assigner.assigner, expected)
        if inner is not assigner.assigner:
            return dataclasses.replace(assigner, assigner=inner)
    return assigner


@overload
def with_assigner(
    model: RetinaNet, assigner: Assigner, *, anchor_scale: float | None = None
) -> AssignedRetinaNet: ...


@overload
def with_assigner(
    model: FCOS, assigner: Assigner, *, anchor_scale: float | None = None
) -> AssignedFCOS: ...


def with_assigner(
    model: RetinaNet | FCOS, assigner: Assigner, *, anchor_scale: float | None = None
) -> AssignedRetinaNet | AssignedFCOS:
    """RetinaNet or FCOS trained with ``assigner`` (e.g. ``ATSSAssigner(topk=9)``), same weights.

    The returned model (``AssignedRetinaNet`` or ``AssignedFCOS``) shares every submodule with
    ``model`` (training one trains the other); ``model`` itself is left as it was. ATSS's own
    setting is one square anchor per location (``hardmine.models.build("atss_r50_fpn", ...)``).
    An assigner that counts the anchors per location (``ATSSAssigner.anchors_per_location``)
    gets the model's count when it left the setting at its default: on torchvision's RetinaNet
    (9 anchors per location) ``ATSSAssigner(topk=9)`` becomes
    ``ATSSAssigner(topk=9, anchors_per_location=9)``.

    Args:
        model: a torchvision ``RetinaNet`` or ``FCOS`` (or one already wrapped).
        assigner: labels the anchors.
        anchor_scale: FCOS only: the assigner sees FCOS's ``1 x stride`` anchors scaled about
            their centres by this factor (see ``AssignedFCOS``). ``None``: that of ``model`` if it
            is an ``AssignedFCOS``, else the ATSS paper's 8.

    Raises:
        TypeError: ``model`` is neither a RetinaNet nor an FCOS (Faster / Mask R-CNN take their
            assigner through ``with_sampler(model, sampler, assigner=...)``), or ``assigner`` is
            not an assigner object (a name such as ``"atss"``, or a class).
        ValueError: when the assigner's ``anchors_per_location``, set to other than its default,
            disagrees with the model's anchor generator, or ``anchor_scale`` is given for a
            RetinaNet.
    """
    if not isinstance(model, RetinaNet | FCOS):
        raise TypeError(
            f"with_assigner takes a torchvision RetinaNet or FCOS, got {type(model).__name__}; "
            "Faster / Mask R-CNN take an assigner through with_sampler(model, sampler, "
            "assigner=...)"
        )
    require_component(assigner, "assigner")
    assigner = fit_anchors_per_location(
        assigner, model.anchor_generator.num_anchors_per_location()[0]
    )
    if isinstance(model, FCOS):
        if anchor_scale is None:
            anchor_scale = (
                model.anchor_scale if isinstance(model, AssignedFCOS) else ATSS_ANCHOR_SCALE
            )
        return AssignedFCOS(model, assigner=assigner, anchor_scale=anchor_scale)
    if anchor_scale is not None:
        raise ValueError("anchor_scale applies to FCOS only; RetinaNet's assigner sees its anchors")
    return AssignedRetinaNet(model, assigner=assigner)
