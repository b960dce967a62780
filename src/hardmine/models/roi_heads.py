"""RoI heads for torchvision's Faster / Mask R-CNN that train on a hardmine sampler's picks.

``SamplingRoIHeads`` subclasses torchvision's ``RoIHeads`` and keeps its modules, weights and
settings. Inference (``eval()``) is torchvision's own code path, untouched. Training replaces
torchvision's ``select_training_samples`` + ``fastrcnn_loss`` (+ ``maskrcnn_loss``) with:

1. append the ground-truth boxes to the proposals (as torchvision does), then any offline-mined
   hard negatives the targets carry (``"hard_negatives"``, see ``hardmine.mine``);
2. assign them with a hardmine ``Assigner`` (max-IoU, torchvision's thresholds, by default);
3. for samplers that need losses (OHEM, Shrivastava et al., CVPR 2016): a read-only pass of the
   box head over *all* proposals under ``torch.no_grad()`` gives every RoI's loss
   (``hardmine.models.read_only.score_rois``);
   Samplers with ``needs_scores`` (PISA's ISR-N) get the same pass with every RoI's scores and
   predicted box (``predict_rois``);
4. the sampler picks; the training pass runs RoI-align and the box head on the picks only, and
   the mask or keypoint head on the picked positives, with the picks' weights in the losses
   (``hardmine.models._losses``);
5. a sampler's ``pisa_loss`` (PISA's ISR-P and CARL) reweights the positives' classification
   loss and adds ``loss_carl`` (``hardmine.models._pisa``).

"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.roi_heads import RoIHeads

from hardmine.boxes import upcast
from hardmine.models._checks import require_component, require_generator, require_rcnn
from hardmine.models._losses import (
    TORCHVISION_BOX_BETA,
    fastrcnn_roi_losses,
    matched_boxes,
    weighted_keypoint_loss,
    weighted_mask_loss,
    weighted_mean,
)
from hardmine.models._pisa import carl_loss, isr_p_classification_weight
from hardmine.models._transform import append_hard_negatives, target_boxes, with_box_keys
from hardmine.models.read_only import heads_assigner, predict_rois, score_rois
from hardmine.models.rpn import SamplingRPN
from hardmine.structures import Assigner, Assignment, RoIScores, Sampler


class SamplingRoIHeads(RoIHeads):
    """torchvision ``RoIHeads`` whose training picks come from a hardmine sampler.

    Overrides ``forward`` in training mode only (eval mode calls ``RoIHeads.forward``). Of the
    parent, it uses ``add_gt_proposals``, ``check_targets``, ``box_coder`` and the box / mask
    modules; its ``proposal_matcher`` and ``fg_bg_sampler`` are replaced by ``assigner`` and
    ``sampler``. Mask and keypoint heads (Mask / Keypoint R-CNN) train on the picked positives,
    as torchvision's do on its sampled positives, each RoI's loss weighted by its pick's weight.

    Args:
        heads: the torchvision heads whose modules and settings to share (not copied).
        sampler: picks the RoIs to train on, per image; OHEM-style samplers receive every RoI's
            loss (``losses: [N_i]``, classification log loss + smooth-L1 of foreground RoIs).
        assigner: labels the proposals; default ``MaxIoUAssigner`` with ``heads``' thresholds
            (torchvision: positive IoU >= 0.5, negative < 0.5) and no low-quality matches.
        generator: passed to the sampler on every step.
        score_dtype: the precision of the read-only pass's box head (``torch.bfloat16`` or
            ``torch.float16``, by autocast); the losses themselves are computed in float32.
            ``"auto"`` (default): bfloat16 where the device computes it natively (a CPU with
            AVX512-BF16 or AMX, a CUDA GPU with bfloat16 units), else as ``None``: the model's
            own precision, under whatever autocast the caller set (e.g. AMP on CUDA). In
            bfloat16 the loss ranking is nearly, not exactly, the float32 one (OHEM picks 99.7%
            of the same RoIs on a trained tiny Faster R-CNN, ``benchmarks/score_dtype.py``),
            and the read-only box head is about twice as fast on such a CPU.
        box_loss_beta: the smooth-L1 beta of the box loss, in training and in the read-only
            pass alike: OHEM ranks by the loss the network trains with (the read-only network is
            a copy of the trained one, Shrivastava et al., Sec. 4.2). Default: torchvision's
            1/9 (Detectron's), the detector's own loss; 1 is Fast R-CNN's (Girshick, ICCV 2015,
            Eq. 3), the loss of the OHEM paper's detector; 0 is the L1 loss (``smooth_l1_loss``
            at beta 0).
    """

    def __init__(
        self,
        heads: RoIHeads,
        *,
        sampler: Sampler,
        assigner: Assigner | None = None,
        generator: torch.Generator | None = None,
        score_dtype: torch.dtype | str | None = "auto",
        box_loss_beta: float = TORCHVISION_BOX_BETA,
    ) -> None:
        if not (math.isfinite(box_loss_beta) and box_loss_beta >= 0):
            raise ValueError(f"box_loss_beta must be a finite number >= 0, got {box_loss_beta}")
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
            keypoint_roi_pool=heads.keypoint_roi_pool,
            keypoint_head=heads.keypoint_head,
            keypoint_predictor=heads.keypoint_predictor,
        )
        self.box_coder = heads.box_coder
        self.sampler = sampler
        self.assigner = assigner or heads_assigner(heads)
        self.generator = generator
        self.score_dtype = score_dtype
        self.box_loss_beta = box_loss_beta

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
            targets: per image, ``boxes [G_i, 4]``, ``labels int64 [G_i]`` (and ``masks`` or
                ``keypoints [G_i, K, 3]``).
        """
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        self.check_targets(targets)
        assert targets is not None  # check_targets raised otherwise
        # Under autocast the RPN decodes its proposals in float16; the assignment, the
        # samplers' geometry and the regression targets are computed in float32
        # (``hardmine.boxes.upcast``), and the ground truths are never rounded to half.
        proposals = [upcast(p) for p in proposals]
        gt_boxes = [t["boxes"].to(proposals[0].dtype) for t in targets]
        gt_labels = [t["labels"] for t in targets]
        proposals = self.add_gt_proposals(proposals, gt_boxes)
        # Offline-mined hard negatives (``hardmine.mine``) join after the ground-truth copies.
        proposals, mined = append_hard_negatives(proposals, targets)
        ignore = target_boxes(targets, "ignore_boxes", proposals[0])
        assignments = self.assigner(proposals, gt_boxes, gt_labels, ignore_boxes=ignore)

        losses, extra = None, {}
        if getattr(self.sampler, "needs_scores", False):
            scores = self.roi_predictions(features, proposals, image_shapes, gt_boxes, assignments)
            extra["scores"] = scores
            if self.sampler.needs_losses:
                losses = [s.loss for s in scores]
        elif self.sampler.needs_losses:
            losses = self.roi_losses(features, proposals, image_shapes, gt_boxes, assignments)
        # Passed only when there are mined boxes (and ``scores`` only to samplers that ask), so a
        # sampler written to the protocol before it carried them still works.
        if mined is not None:
            extra["mined"] = mined
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
        targets_reg = torch.cat(targets_reg)
        cls, box = fastrcnn_roi_losses(
            class_logits, box_regression, labels, targets_reg, beta=self.box_loss_beta
        )
        cls_weight = weight
        pisa = getattr(self.sampler, "pisa_loss", None)
        if pisa is not None and pisa.isr_p:
            cls_weight = isr_p_classification_weight(
                pisa,
                rois=torch.cat(rois),
                box_regression=box_regression,
                labels=labels,
                matched=torch.cat(
                    [matched_boxes(r, g, a) for r, g, a in zip(rois, gt_boxes, picked, strict=True)]
                ),
                image=torch.cat([torch.full_like(i, k) for k, i in enumerate(picks)]),
                gt_index=torch.cat([a.gt_index for a in picked]),
                cls_loss=cls.detach(),
                weight=weight,
                box_coder=self.box_coder,
            )
        out = {
            "loss_classifier": weighted_mean(cls, cls_weight, labels.numel()),
            "loss_box_reg": weighted_mean(box, weight, labels.numel()),
        }
        if pisa is not None and pisa.carl:
            out["loss_carl"] = carl_loss(
                pisa,
                class_logits=class_logits,
                box_regression=box_regression,
                labels=labels,
                regression_targets=targets_reg,
                beta=self.box_loss_beta,
            )
        if self.has_mask():
            out["loss_mask"] = self.mask_loss(features, rois, image_shapes, targets, picked, weight)
        if self.has_keypoint():
            out["loss_keypoint"] = self.keypoint_loss(
                features, rois, image_shapes, targets, picked, weight
            )
        return [], out

    def roi_losses(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        gt_boxes: list[Tensor],
        assignments: list[Assignment],
    ) -> list[Tensor]:
        """OHEM's read-only pass over these heads: ``score_rois`` in ``score_dtype``.

        Returns:
            Per image, ``[N_i]``: classification log loss plus the foreground smooth-L1 box loss.
        """
        return score_rois(
            self,
            features,
            proposals,
            image_shapes,
            gt_boxes,
            assignments,
            score_dtype=self.score_dtype,
            box_loss_beta=self.box_loss_beta,
        )

    def roi_predictions(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        gt_boxes: list[Tensor],
        assignments: list[Assignment],
    ) -> list[RoIScores]:
        """The read-only pass with scores and predicted boxes, for samplers with
        ``needs_scores`` (PISA): ``predict_rois`` in ``score_dtype``."""
        return predict_rois(
            self,
            features,
            proposals,
            image_shapes,
            gt_boxes,
            assignments,
            score_dtype=self.score_dtype,
            box_loss_beta=self.box_loss_beta,
        )

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
        positive, pos_rois, gt_index = _picked_positives(rois, picked)
        mask_logits = self.mask_predictor(
            self.mask_head(self.mask_roi_pool(features, pos_rois, image_shapes))
        )
        return weighted_mask_loss(
            mask_logits,
            pos_rois,
            [t["masks"] for t in targets],
            torch.cat([a.gt_class[p] for a, p in zip(picked, positive, strict=True)]),
            gt_index,
            weight[torch.cat(positive)],
        )

    def keypoint_loss(
        self,
        features: dict[str, Tensor],
        rois: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
        picked: list[Assignment],
        weight: Tensor,
    ) -> Tensor:
        """Weighted keypoint loss of the picked positives (``weight: [R]`` over all picks)."""
        positive, pos_rois, gt_index = _picked_positives(rois, picked)
        keypoint_logits = self.keypoint_predictor(
            self.keypoint_head(self.keypoint_roi_pool(features, pos_rois, image_shapes))
        )
        return weighted_keypoint_loss(
            keypoint_logits,
            pos_rois,
            [t["keypoints"] for t in targets],
            gt_index,
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
    score_dtype: torch.dtype | str | None = "auto",
    box_loss_beta: float = TORCHVISION_BOX_BETA,
) -> GeneralizedRCNN:
    """Faster / Mask / Keypoint R-CNN whose RoI heads (and optionally RPN) train on sampler picks.

    The returned model is a shallow copy of ``model``: same class, every submodule and weight shared
    (training one trains the other), with ``roi_heads`` replaced by ``SamplingRoIHeads`` and, when
    ``rpn_sampler`` is given, ``rpn`` by ``SamplingRPN``. Targets may carry ``ignore_boxes``
    ``[M, 4]`` (crowd regions): the transform resizes them with the image and the assigners ignore
    the candidates they cover. ``model`` itself is left as it was, so
    the two can be compared; inference is identical.

    Args:
        model: a torchvision ``FasterRCNN``, ``MaskRCNN`` or ``KeypointRCNN`` (any
            ``GeneralizedRCNN`` with torchvision ``RoIHeads``).
        sampler: picks the RoIs, e.g. ``RandomSampler(num=512)``, ``OHEMSampler(num=64)``,
            ``PISASampler(num=512)`` (its ``pisa_loss`` also reweights the training pass).
        rpn_sampler: picks the RPN's anchors; torchvision's random sampler when ``None``. Not
            one that needs the box head's scores or weights its losses (PISA).
        assigner: labels the proposals; max-IoU with torchvision's thresholds when ``None``.
        generator: makes the samplers' picks reproducible.
        score_dtype: the precision of OHEM's read-only pass (see ``SamplingRoIHeads``).
        box_loss_beta: the box loss's smooth-L1 beta, trained and ranked by (see
            ``SamplingRoIHeads``).

    Raises:
        TypeError: ``model`` is not an R-CNN (RetinaNet and FCOS take an assigner through
            ``with_assigner``), or a sampler / assigner is not an instance of one (a name such
            as ``"ohem"``, or a class).
    """
    require_rcnn(model)
    require_component(sampler, "sampler")
    require_generator(generator)
    if rpn_sampler is not None:
        require_component(rpn_sampler, "rpn_sampler")
        if getattr(rpn_sampler, "needs_scores", False) or getattr(rpn_sampler, "pisa_loss", None):
            raise ValueError(
                f"rpn_sampler: {type(rpn_sampler).__name__} ranks by the box head's scores or "
                "weights the box head's losses (PISA), which an RPN has not; give it to sampler"
            )
    if assigner is not None:
        require_component(assigner, "assigner")
    # Seeding deepcopy's memo with the children copies the model object but shares its modules.
    wrapped = copy.deepcopy(model, memo={id(m): m for m in model.children()})
    predictor = getattr(model.roi_heads.box_predictor, "cls_score", None)
    wrapped.transform = with_box_keys(model.transform, getattr(predictor, "out_features", None))
    wrapped.roi_heads = SamplingRoIHeads(
        model.roi_heads,
        sampler=sampler,
        assigner=assigner,
        generator=generator,
        score_dtype=score_dtype,
        box_loss_beta=box_loss_beta,
    )
    if rpn_sampler is not None:
        wrapped.rpn = SamplingRPN(model.rpn, sampler=rpn_sampler, generator=generator)
    return wrapped


def _picked_positives(
    rois: list[Tensor], picked: list[Assignment]
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Per image, the picked positives' mask, their RoIs and their ground truths' indices: what
    the mask and keypoint branches train on."""
    positive = [a.positive for a in picked]
    pos_rois = [r[p] for r, p in zip(rois, positive, strict=True)]
    gt_index = [a.gt_index[p] for a, p in zip(picked, positive, strict=True)]
    return positive, pos_rois, gt_index
