"""torchvision's region proposal network with its anchor sampler swapped for a hardmine sampler."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, concat_box_prediction_layers

from hardmine.assign.max_iou import MaxIoUAssigner
from hardmine.boxes import upcast
from hardmine.models._losses import matched_boxes, rpn_anchor_losses, weighted_mean
from hardmine.models._transform import target_boxes
from hardmine.structures import Assigner, Sampler


def propose(
    rpn: RegionProposalNetwork,
    images: ImageList,
    features: dict[str, Tensor],
    *,
    training: bool | None = None,
) -> tuple[list[Tensor], Tensor, Tensor, list[Tensor]]:
    """The RPN's head, anchors and proposals, as torchvision's ``forward`` computes them.

    Args:
        rpn: the RPN.
        images: the transformed batch.
        features: the backbone's feature maps by name.
        training: which of the RPN's top-n settings to filter the proposals with (torchvision
            keeps more in training, e.g. 2000 against 1000); the module's own mode when None.

    Returns:
        ``(proposals, objectness, deltas, anchors)``: per image the proposals ``[P_i, 4]``
        (detached: Faster R-CNN does not backpropagate through them, nor does torchvision);
        the objectness logits ``[B * A, 1]`` and box deltas ``[B * A, 4]`` of every anchor;
        per image the anchors ``[A, 4]``.
    """
    feature_list = list(features.values())
    objectness, deltas = rpn.head(feature_list)
    anchors = rpn.anchor_generator(images, feature_list)
    num_per_level = [o[0].numel() for o in objectness]  # A * H * W per level
    objectness, deltas = concat_box_prediction_layers(objectness, deltas)  # [B*A, 1], [B*A, 4]
    proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
    # filter_proposals reads the top-n setting from the module's mode only.
    was_training = rpn.training
    rpn.training = was_training if training is None else training
    try:
        boxes, _ = rpn.filter_proposals(proposals, objectness, images.image_sizes, num_per_level)
    finally:
        rpn.training = was_training
    return boxes, objectness, deltas, anchors


class SamplingRPN(RegionProposalNetwork):
    """torchvision ``RegionProposalNetwork`` whose training anchors come from a hardmine sampler.

    Overrides ``forward`` in training mode only (eval mode calls the parent's). The proposals are
    computed exactly as torchvision does; the loss replaces ``assign_targets_to_anchors`` and
    ``compute_loss`` with ``assigner`` + ``sampler`` and weights the picks' losses as
    ``sum(w * loss) / num_picked`` (torchvision's normalisation when the weights are 1). The RPN
    scores every anchor anyway, so samplers that need losses get them at no extra pass: the
    per-anchor objectness log loss plus the positives' smooth-L1, detached.

    Args:
        rpn: the torchvision RPN whose modules and settings to share (not copied).
        sampler: picks the anchors to train on, per image.
        assigner: default ``MaxIoUAssigner`` with ``rpn``'s thresholds (torchvision: positive
            IoU >= 0.7, negative < 0.3) and low-quality matches, as torchvision's matcher.
        generator: passed to the sampler on every step.
    """

    def __init__(
        self,
        rpn: RegionProposalNetwork,
        *,
        sampler: Sampler,
        assigner: Assigner | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        matcher, fg_bg = rpn.proposal_matcher, rpn.fg_bg_sampler
        # torchvision keeps the train / test top-n settings only in these private dicts.
        super().__init__(
            rpn.anchor_generator,
            rpn.head,
            matcher.high_threshold,
            matcher.low_threshold,
            fg_bg.batch_size_per_image,
            fg_bg.positive_fraction,
            rpn._pre_nms_top_n,
            rpn._post_nms_top_n,
            rpn.nms_thresh,
            rpn.score_thresh,
        )
        self.box_coder = rpn.box_coder
        self.min_size = rpn.min_size
        self.sampler = sampler
        self.assigner = assigner or MaxIoUAssigner(
            pos_thr=matcher.high_threshold,
            neg_thr=matcher.low_threshold,
            low_quality=matcher.allow_low_quality_matches,
        )
        self.generator = generator

    def forward(
        self,
        images: ImageList,
        features: dict[str, Tensor],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """torchvision's signature: per image the proposals ``[P_i, 4]``, and the losses."""
        if not self.training:
            return super().forward(images, features, targets)
        if targets is None:
            raise ValueError("targets should not be None in training mode")
        boxes, objectness, deltas, anchors = propose(self, images, features)
        # The anchor generator works in the features' dtype (float16 under autocast); the
        # assignment and the regression targets are computed in float32.
        anchors = [upcast(a) for a in anchors]
        gt_boxes = [t["boxes"].to(anchors[0].dtype) for t in targets]
        ignore = target_boxes(targets, "ignore_boxes", anchors[0])
        labels = [t["labels"] for t in targets]
        assignments = self.assigner(anchors, gt_boxes, labels, ignore_boxes=ignore)
        labels = torch.cat([a.positive for a in assignments]).to(objectness.dtype)  # [B*A]
        targets_reg = torch.cat(
            self.box_coder.encode(
                [
                    matched_boxes(a, g, s)
                    for a, g, s in zip(anchors, gt_boxes, assignments, strict=True)
                ],
                anchors,
            )
        )
        objectness = objectness.flatten()
        losses = None
        if self.sampler.needs_losses:
            with torch.no_grad():
                obj, box = rpn_anchor_losses(objectness, deltas, labels, targets_reg)
            losses = list((obj + box).split([a.shape[0] for a in anchors]))
        selections = self.sampler(anchors, assignments, losses=losses, generator=self.generator)
        picks = torch.where(torch.cat([s.mask for s in selections]))[0]
        weight = torch.cat([s.weight for s in selections])[picks]
        obj, box = rpn_anchor_losses(
            objectness[picks], deltas[picks], labels[picks], targets_reg[picks]
        )
        return boxes, {
            "loss_objectness": weighted_mean(obj, weight, picks.numel()),
            "loss_rpn_box_reg": weighted_mean(box, weight, picks.numel()),
        }
