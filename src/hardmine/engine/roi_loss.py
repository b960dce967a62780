"""The loss of every RoI, not only the picked ones: OHEM's sampler-independent training measure.

Shrivastava et al. (CVPR 2016, Sec. 5.3, Fig. 2) compare sampling methods by the mean loss per RoI
over *all* RoIs of the training set: a sampler that trains only on easy examples lowers its own
loss but not this one. Every RoI means every proposal of the RPN in its training setting, with the
ground-truth boxes appended, exactly the candidates the samplers choose from during training.

The pass is read-only: no gradient, the detector in eval mode (normalisation layers use their
running statistics, so the measure does not depend on the batch), and the RoI losses come from
the model integration's OHEM pass (``SamplingRoIHeads.roi_losses``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, concat_box_prediction_layers
from torchvision.models.detection.transform import resize_boxes

from hardmine.data import collate_fn
from hardmine.models import SamplingRoIHeads
from hardmine.sample import RandomSampler
from hardmine.structures import IGNORE, Assignment


def rcnn_heads(model: nn.Module) -> SamplingRoIHeads | None:
    """``model``'s RoI heads as ``SamplingRoIHeads`` (torchvision's are wrapped, sharing their
    modules and thresholds), or None for a detector without RoI heads (RetinaNet, FCOS, ATSS)."""
    heads = getattr(model, "roi_heads", None)
    if isinstance(heads, SamplingRoIHeads):
        return heads
    if isinstance(heads, RoIHeads):
        # The sampler is never called: only the assigner and the read-only loss pass are used.
        return SamplingRoIHeads(heads, sampler=RandomSampler())
    return None


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode, its previous mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def train_mode_proposals(
    rpn: RegionProposalNetwork, images: ImageList, features: dict[str, Tensor]
) -> list[Tensor]:
    """The RPN's proposals with its *training* top-n settings, without its losses.

    torchvision's RPN keeps more proposals in training (e.g. 2000 after NMS) than at test time
    (1000), and the samplers choose from the training ones; its ``filter_proposals`` reads the
    setting from the module's mode, so only the RPN module (not its head) is switched for that call.

    Returns:
        Per image, ``[P_i, 4]`` in the transformed images' pixels.
    """
    feature_list = list(features.values())
    objectness, deltas = rpn.head(feature_list)
    anchors = rpn.anchor_generator(images, feature_list)
    num_per_level = [o[0].numel() for o in objectness]  # A * H * W per level
    objectness, deltas = concat_box_prediction_layers(objectness, deltas)  # [B*A, 1], [B*A, 4]
    proposals = rpn.box_coder.decode(deltas, anchors).view(len(anchors), -1, 4)
    was_training = rpn.training
    rpn.training = True
    try:
        boxes, _ = rpn.filter_proposals(proposals, objectness, images.image_sizes, num_per_level)
    finally:
        rpn.training = was_training
    return boxes


@dataclass(frozen=True)
class RoIBatch:
    """A batch's RoIs as the RoI heads see them in training, in the transformed images' pixels.

    Attributes:
        features: the backbone's feature maps, ``[B, C, H_l, W_l]`` each.
        image_sizes: per image, ``(H, W)`` after the detector's transform.
        original_sizes: per image, ``(H, W)`` as given.
        proposals: per image, ``[N_i, 4]``: the proposals with the ground truths appended.
        gt_boxes: per image, ``[G_i, 4]``.
        gt_labels: per image, ``int64 [G_i]``.
        assignments: per image, the RoI heads' assignment of ``proposals``.
    """

    features: dict[str, Tensor]
    image_sizes: list[tuple[int, int]]
    original_sizes: list[tuple[int, int]]
    proposals: list[Tensor]
    gt_boxes: list[Tensor]
    gt_labels: list[Tensor]
    assignments: list[Assignment]

    def to_original(self, boxes: Sequence[Tensor]) -> list[Tensor]:
        """Per-image boxes in the transformed pixels -> the original images' pixels."""
        return [
            resize_boxes(b, new, old)
            for b, new, old in zip(boxes, self.image_sizes, self.original_sizes, strict=True)
        ]


@torch.no_grad()
def roi_batch(
    model: nn.Module,
    images: Sequence[Tensor],
    targets: Sequence[dict[str, Any]],
    *,
    proposals: Sequence[Tensor] | None = None,
) -> RoIBatch:
    """Run a Faster / Mask R-CNN up to its RoI heads' assignment, read-only, in eval mode.

    Args:
        model: a torchvision ``FasterRCNN`` or ``MaskRCNN`` (with or without sampling heads).
        images: per image, ``float [3, H, W]``.
        targets: per image, ``boxes [G, 4]`` and ``labels int64 [G]`` in the image's pixels.
        proposals: per image, ``[P_i, 4]`` in the image's pixels to use instead of the RPN's
            training proposals.

    Raises:
        ValueError: ``model`` has no RoI heads.
    """
    heads = rcnn_heads(model)
    if heads is None:
        raise ValueError(f"{type(model).__name__} has no RoI heads (Faster / Mask R-CNN needed)")
    original_sizes = [(int(i.shape[-2]), int(i.shape[-1])) for i in images]
    # Boxes and labels only: the transform would otherwise resize masks nobody reads here.
    plain = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
    with eval_mode(model):
        image_list, resized = model.transform(list(images), plain)
        features = model.backbone(image_list.tensors)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        if proposals is None:
            boxes = train_mode_proposals(model.rpn, image_list, features)
        else:
            boxes = [
                resize_boxes(p.to(image_list.tensors), old, new)
                for p, old, new in zip(
                    proposals, original_sizes, image_list.image_sizes, strict=True
                )
            ]
    gt_boxes = [t["boxes"].to(boxes[0].dtype) for t in resized]
    gt_labels = [t["labels"] for t in resized]
    boxes = heads.add_gt_proposals(boxes, gt_boxes)
    return RoIBatch(
        features=features,
        image_sizes=list(image_list.image_sizes),
        original_sizes=original_sizes,
        proposals=boxes,
        gt_boxes=gt_boxes,
        gt_labels=gt_labels,
        assignments=heads.assigner(boxes, gt_boxes, gt_labels),
    )


def roi_losses(model: nn.Module, batch: RoIBatch) -> list[Tensor]:
    """Every RoI's loss (classification log loss + foreground smooth-L1), read-only.

    Returns:
        Per image, ``float [N_i]`` for ``batch.proposals``.

    Raises:
        ValueError: ``model`` has no RoI heads.
    """
    heads = rcnn_heads(model)
    if heads is None:
        raise ValueError(f"{type(model).__name__} has no RoI heads (Faster / Mask R-CNN needed)")
    with eval_mode(model):
        return heads.roi_losses(
            batch.features, batch.proposals, batch.image_sizes, batch.gt_boxes, batch.assignments
        )


def mean_loss_all_rois(
    model: nn.Module,
    data: Dataset | DataLoader,
    *,
    device: torch.device | str,
    max_images: int | None = None,
    batch_size: int = 4,
) -> float | None:
    """Mean loss per RoI over all RoIs of ``data`` (Shrivastava et al., CVPR 2016, Fig. 2).

    All RoIs: the RPN's training proposals plus the ground truths, every one the assigner does not
    ignore, whichever a sampler would pick. Each RoI's loss is OHEM's: softmax log loss plus the
    smooth-L1 box loss of foreground RoIs.

    Args:
        model: the detector, unwrapped from DDP, on ``device``; its mode is restored afterwards.
        data: the training set, or a loader of ``(images, targets)`` batches from it.
        device: where ``model`` is.
        max_images: only the first this many images.
        batch_size: images per forward pass when ``data`` is a dataset.

    Returns:
        The mean, NaN when there are no RoIs; None for a detector without RoI heads.
    """
    if rcnn_heads(model) is None:
        return None
    loader = (
        data
        if isinstance(data, DataLoader)
        else DataLoader(data, batch_size=batch_size, collate_fn=collate_fn)
    )
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    for images, targets in loader:
        take = len(images) if max_images is None else min(len(images), max_images - seen)
        if take <= 0:
            break
        batch = roi_batch(
            model,
            [i.to(device) for i in images[:take]],
            [{k: t[k].to(device) for k in ("boxes", "labels")} for t in targets[:take]],
        )
        losses = torch.cat(roi_losses(model, batch))
        counted = torch.cat([a.label for a in batch.assignments]) != IGNORE
        total += losses[counted].sum()
        count += counted.sum()
        seen += take
    return float(total / count) if int(count) else float("nan")
