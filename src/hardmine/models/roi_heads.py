"""RoI heads for torchvision's Faster / Mask R-CNN that train on a hardmine sampler's picks.

``SamplingRoIHeads`` subclasses torchvision's ``RoIHeads`` and keeps its modules, weights and
settings. Inference (``eval()``) is torchvision's own code path, untouched. Training replaces
torchvision's ``select_training_samples`` + ``fastrcnn_loss`` (+ ``maskrcnn_loss``) with:

1. append the ground-truth boxes to the proposals (as torchvision does), then any offline-mined
   hard negatives the targets carry (``"hard_negatives"``, see ``hardmine.mine``);
2. assign them with a hardmine ``Assigner`` (max-IoU, torchvision's thresholds, by default);
3. for samplers that need losses (OHEM, Shrivastava et al., CVPR 2016): a read-only pass of the
   box head over *all* proposals under ``torch.no_grad()`` gives every RoI's loss, in slices of
   ``READ_ONLY_SLICE_BYTES`` of pooled features;
4. the sampler picks; the training pass runs RoI-align and the box (and mask) head on the picks
   only, with the picks' weights in the losses (``hardmine.models._losses``).

On a CPU, the read-only pass's RoI-align runs on all of torch's threads (``hardmine.models._pool``);
torchvision's kernel uses one.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.roi_heads import RoIHeads

from hardmine.assign.max_iou import MaxIoUAssigner
from hardmine.mine.sampler import append_hard_negatives
from hardmine.models._losses import (
    fastrcnn_roi_losses,
    matched_boxes,
    weighted_mask_loss,
    weighted_mean,
)
from hardmine.models._pool import pool_flat, raster_order, to_rois
from hardmine.models._transform import target_boxes, with_box_keys
from hardmine.models.rpn import SamplingRPN
from hardmine.structures import Assigner, Assignment, Sampler

# The read-only pass pools and scores the RoIs in slices of about this many bytes of features.
READ_ONLY_SLICE_BYTES = 16 * 2**20


def run_read_only(module: nn.Module, *args: Tensor) -> Tensor | tuple[Tensor, ...]:
    """Call ``module`` without changing it: buffers (BatchNorm statistics) are updated on copies.

    The read-only pass must not count as a training step for normalisation layers, or OHEM's extra
    pass over thousands of RoIs would skew the running statistics. Call under ``torch.no_grad()``.
    """
    buffers = {name: buf.clone() for name, buf in module.named_buffers()}
    if not buffers:
        return module(*args)
    return functional_call(module, buffers, args, strict=False)


class SamplingRoIHeads(RoIHeads):
    """torchvision ``RoIHeads`` whose training picks come from a hardmine sampler.

    Overrides ``forward`` in training mode only (eval mode calls ``RoIHeads.forward``). Of the
    parent, it uses ``add_gt_proposals``, ``check_targets``, ``box_coder`` and the box / mask
    modules; its ``proposal_matcher`` and ``fg_bg_sampler`` are replaced by ``assigner`` and
    ``sampler``. Keypoint heads are not supported.

    Args:
        heads: the torchvision heads whose modules and settings to share (not copied).
        sampler: picks the RoIs to train on, per image; OHEM-style samplers receive every RoI's
            loss (``losses: [N_i]``, classification log loss + smooth-L1 of foreground RoIs).
        assigner: labels the proposals; default ``MaxIoUAssigner`` with ``heads``' thresholds
            (torchvision: positive IoU >= 0.5, negative < 0.5) and no low-quality matches.
        generator: passed to the sampler on every step.
        score_dtype: the precision of the read-only pass's box head (``torch.bfloat16`` or
            ``torch.float16``, by autocast); the losses themselves are computed in float32.
            ``None`` (default): the model's own precision, under whatever autocast the caller
            set (e.g. AMP on CUDA). The loss ranking is then nearly, not exactly, the float32
            one; on a CPU with bfloat16 units the read-only box head is about 3x faster.
    """

    def __init__(
        self,
        heads: RoIHeads,
        *,
        sampler: Sampler,
        assigner: Assigner | None = None,
        generator: torch.Generator | None = None,
        score_dtype: torch.dtype | None = None,
    ) -> None:
        if heads.has_keypoint():
            raise ValueError("SamplingRoIHeads does not support keypoint heads")
        matcher, fg_bg = heads.proposal_matcher, heads.fg_bg_sampler
        super().__init__(
            heads.box_roi_pool,
            heads.box_head,
            heads.box_predictor,
            matcher.high_threshold,
            matcher.low_threshold,
            fg_bg.batch_size_per_image,
            fg_bg.positive_fraction,
            heads.box_coder.weights,
            heads.score_thresh,
            heads.nms_thresh,
            heads.detections_per_img,
            mask_roi_pool=heads.mask_roi_pool,
            mask_head=heads.mask_head,
            mask_predictor=heads.mask_predictor,
        )
        self.box_coder = heads.box_coder
        self.sampler = sampler
        self.assigner = assigner or MaxIoUAssigner(
            pos_thr=matcher.high_threshold, neg_thr=matcher.low_threshold, low_quality=False
        )
        self.generator = generator
        self.score_dtype = score_dtype

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """torchvision's signature; in training mode returns ``([], losses)``.

        Args:
            features: feature maps by name, ``[B, C, H, W]`` each.
            proposals: per image, ``[N_i, 4]``.
            image_shapes: per image, ``(H, W)`` after the transform.
            targets: per image, ``boxes [G_i, 4]``, ``labels int64 [G_i]`` (and ``masks``).
        """
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        self.check_targets(targets)
        assert targets is not None  # check_targets raised otherwise
        gt_boxes = [t["boxes"].to(proposals[0].dtype) for t in targets]
        gt_labels = [t["labels"] for t in targets]
        proposals = self.add_gt_proposals(proposals, gt_boxes)
        # Offline-mined hard negatives (``hardmine.mine``) join after the ground-truth copies.
        proposals, mined = append_hard_negatives(proposals, targets)
        ignore = target_boxes(targets, "ignore_boxes", proposals[0])
        assignments = self.assigner(proposals, gt_boxes, gt_labels, ignore_boxes=ignore)

        losses = None
        if self.sampler.needs_losses:
            losses = self.roi_losses(features, proposals, image_shapes, gt_boxes, assignments)
        extra = {} if mined is None else {"mined": mined}  # only MinedNegativeSampler takes it
        selections = self.sampler(
            proposals, assignments, losses=losses, generator=self.generator, **extra
        )

        picks = [torch.where(s.mask)[0] for s in selections]
        rois = [p[i] for p, i in zip(proposals, picks, strict=True)]
        picked = [_index(a, i) for a, i in zip(assignments, picks, strict=True)]
        weight = torch.cat([s.weight[i] for s, i in zip(selections, picks, strict=True)])
        labels = torch.cat([a.gt_class for a in picked])
        targets_reg = self.box_coder.encode(
            [matched_boxes(r, g, a) for r, g, a in zip(rois, gt_boxes, picked, strict=True)], rois
        )
        class_logits, box_regression = self.box_predictor(
            self.box_head(self.box_roi_pool(features, rois, image_shapes))
        )
        cls, box = fastrcnn_roi_losses(class_logits, box_regression, labels, torch.cat(targets_reg))
        out = {
            "loss_classifier": weighted_mean(cls, weight, labels.numel()),
            "loss_box_reg": weighted_mean(box, weight, labels.numel()),
        }
        if self.has_mask():
            out["loss_mask"] = self.mask_loss(features, rois, image_shapes, targets, picked, weight)
        return [], out

    @torch.no_grad()
    def roi_losses(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        gt_boxes: list[Tensor],
        assignments: list[Assignment],
    ) -> list[Tensor]:
        """OHEM's read-only pass: every RoI's loss, without gradient and without side effects.

        Returns:
            Per image, ``[N_i]``: classification log loss plus the foreground smooth-L1 box loss,
            the two terms of ``fastrcnn_loss`` before reduction (Shrivastava et al., Sec. 4.1).
        """
        targets_reg = self.box_coder.encode(
            [
                matched_boxes(p, g, a)
                for p, g, a in zip(proposals, gt_boxes, assignments, strict=True)
            ],
            proposals,
        )
        rois = to_rois(proposals)
        labels = torch.cat([a.gt_class for a in assignments])
        targets_reg = torch.cat(targets_reg)
        precision = contextlib.nullcontext()
        if self.score_dtype is not None:
            precision = torch.autocast(rois.device.type, dtype=self.score_dtype)
        # In slices of READ_ONLY_SLICE_BYTES of pooled features: the pass over thousands of RoIs
        # never holds all their features at once, and its buffers are reused rather than faulted
        # in afresh (large fresh allocations are costly on a CPU). The slices follow the raster
        # order, so that each pools RoIs near each other (cache locality; see ``_pool``).
        rows = self._slice_rows(next(iter(features.values())), rois.shape[0])
        order = raster_order(rois)
        out, buffer = [], None
        for part in order.split(rows):
            pooled = pool_flat(self.box_roi_pool, features, rois[part], image_shapes, buffer=buffer)
            buffer = pooled if buffer is None else buffer
            with precision:
                class_logits, box_regression = run_read_only(
                    self.box_predictor, run_read_only(self.box_head, pooled)
                )
            cls, box = fastrcnn_roi_losses(
                class_logits.to(pooled.dtype),
                box_regression.to(pooled.dtype),
                labels[part],
                targets_reg[part],
            )
            out.append(cls + box)
        in_order = torch.cat(out)
        losses = torch.empty_like(in_order).index_copy_(0, order, in_order)
        return list(losses.split([p.shape[0] for p in proposals]))

    def _slice_rows(self, feature: Tensor, total: int) -> int:
        """RoIs per slice of the read-only pass: ``READ_ONLY_SLICE_BYTES`` of pooled features."""
        size = getattr(self.box_roi_pool, "output_size", None)
        if size is None:  # not torchvision's pooler: one slice
            return max(1, total)
        h, w = (size, size) if isinstance(size, int) else size
        return max(1, READ_ONLY_SLICE_BYTES // (feature.shape[1] * h * w * feature.element_size()))

    def mask_loss(
        self,
        features: dict[str, Tensor],
        rois: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
        picked: list[Assignment],
        weight: Tensor,
    ) -> Tensor:
        """Weighted mask loss of the picked positives (``weight: [R]`` over all picks)."""
        positive = [a.positive for a in picked]
        pos_rois = [r[p] for r, p in zip(rois, positive, strict=True)]
        mask_logits = self.mask_predictor(
            self.mask_head(self.mask_roi_pool(features, pos_rois, image_shapes))
        )
        return weighted_mask_loss(
            mask_logits,
            pos_rois,
            [t["masks"] for t in targets],
            torch.cat([a.gt_class[p] for a, p in zip(picked, positive, strict=True)]),
            [a.gt_index[p] for a, p in zip(picked, positive, strict=True)],
            weight[torch.cat(positive)],
        )


def _index(assignment: Assignment, index: Tensor) -> Assignment:
    """The assignment of the candidates at ``index: int64 [R]``."""
    return Assignment(
        label=assignment.label[index],
        gt_index=assignment.gt_index[index],
        max_iou=assignment.max_iou[index],
        gt_class=assignment.gt_class[index],
    )


def with_sampler(
    model: GeneralizedRCNN,
    sampler: Sampler,
    *,
    rpn_sampler: Sampler | None = None,
    assigner: Assigner | None = None,
    generator: torch.Generator | None = None,
    score_dtype: torch.dtype | None = None,
) -> GeneralizedRCNN:
    """Faster / Mask R-CNN whose RoI heads (and optionally RPN) train on a hardmine sampler's picks.

    The returned model is a shallow copy of ``model``: same class, every submodule and weight shared
    (training one trains the other), with ``roi_heads`` replaced by ``SamplingRoIHeads`` and, when
    ``rpn_sampler`` is given, ``rpn`` by ``SamplingRPN``. Targets may carry ``ignore_boxes``
    ``[M, 4]`` (crowd regions): the transform resizes them with the image and the assigners ignore
    the candidates they cover. ``model`` itself is left as it was, so
    the two can be compared; inference is identical.

    Args:
        model: a torchvision ``FasterRCNN`` or ``MaskRCNN``.
        sampler: picks the RoIs, e.g. ``RandomSampler(num=512)``, ``OHEMSampler(num=128)``.
        rpn_sampler: picks the RPN's anchors; torchvision's random sampler when ``None``.
        assigner: labels the proposals; max-IoU with torchvision's thresholds when ``None``.
        generator: makes the samplers' picks reproducible.
        score_dtype: the precision of OHEM's read-only pass (see ``SamplingRoIHeads``).
    """
    # Seeding deepcopy's memo with the children copies the model object but shares its modules.
    wrapped = copy.deepcopy(model, memo={id(m): m for m in model.children()})
    wrapped.transform = with_box_keys(model.transform)
    wrapped.roi_heads = SamplingRoIHeads(
        model.roi_heads,
        sampler=sampler,
        assigner=assigner,
        generator=generator,
        score_dtype=score_dtype,
    )
    if rpn_sampler is not None:
        wrapped.rpn = SamplingRPN(model.rpn, sampler=rpn_sampler, generator=generator)
    return wrapped
