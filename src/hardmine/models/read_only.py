"""The read-only pass: every RoI's loss, with no gradient and no side effects.

OHEM (Shrivastava et al., CVPR 2016) scores every RoI with a read-only copy of the RoI network
(Sec. 4.2) and trains on the highest-loss ones (Sec. 4.1); the OHEM paper's sampler-independent
measure (Sec. 5.5, Fig. 3) is the mean of the same losses over all RoIs; ``hardmine inspect``
draws what every sampler picks from the same RoIs. All three use these free functions of
torchvision's modules, on plain ``RoIHeads`` and on ``SamplingRoIHeads`` alike:

- ``score_rois``: the losses of given RoIs, from the heads' box pooler, box head and predictor;
  ``predict_rois``: the same with their scores and predicted boxes (PISA's ISR-N ranks by them);
- ``roi_batch`` / ``roi_losses``: a whole detector run up to its RoI heads' assignment, read-only,
  and the losses of every RoI it gives.

On a CPU the pooling runs on all of torch's threads, in raster order (``hardmine.models._pool``).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import resize_boxes

from hardmine.assign.max_iou import MaxIoUAssigner
from hardmine.boxes import upcast
from hardmine.models._losses import TORCHVISION_BOX_BETA, fastrcnn_roi_losses, matched_boxes
from hardmine.models._pool import pool_parts, raster_order
from hardmine.models._roi_align import to_rois
from hardmine.models.rpn import propose
from hardmine.structures import Assigner, Assignment, RoIScores

#: The read-only pass pools and scores the RoIs in slices of about this many bytes of features.
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


def heads_assigner(heads: RoIHeads) -> Assigner:
    """The assigner ``heads`` train with: a ``SamplingRoIHeads``' own, else max-IoU with the
    heads' matcher thresholds (torchvision: positive IoU >= 0.5, negative < 0.5) and no
    low-quality matches, which is torchvision's rule."""
    assigner = getattr(heads, "assigner", None)
    if assigner is not None:
        return assigner
    matcher = heads.proposal_matcher
    return MaxIoUAssigner(
        pos_thr=matcher.high_threshold, neg_thr=matcher.low_threshold, low_quality=False
    )


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` multiplies ``bfloat16`` matrices in hardware: a CUDA GPU with native
    bfloat16 (Ampere or later), or a CPU with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(getattr(torch.cpu, p, lambda: False)() for p in probes)
    return False


def resolve_score_dtype(
    score_dtype: torch.dtype | str | None, device: torch.device
) -> torch.dtype | None:
    """``score_dtype`` on ``device``: ``"auto"`` is ``torch.bfloat16`` where the device computes it
    natively (``native_bfloat16``) and ``None`` (the model's own precision) elsewhere.

    bfloat16 is the default where native because OHEM then picks nearly the same RoIs at a
    fraction of the box head's cost: on the tiny Faster R-CNN trained on scenes (AP50 0.35), 99.7%
    of float32's picks, 98.4% on the worst of 80 images (``benchmarks/score_dtype.py``).
    """
    if score_dtype == "auto":
        return torch.bfloat16 if native_bfloat16(device) else None
    if isinstance(score_dtype, str):
        raise ValueError(f"score_dtype must be a torch dtype, 'auto' or None, got {score_dtype!r}")
    return score_dtype


@torch.no_grad()
def score_rois(
    heads: RoIHeads,
    features: dict[str, Tensor],
    proposals: Sequence[Tensor],
    image_shapes: Sequence[tuple[int, int]],
    gt_boxes: Sequence[Tensor],
    assignments: Sequence[Assignment],
    *,
    score_dtype: torch.dtype | str | None = None,
    box_loss_beta: float = TORCHVISION_BOX_BETA,
) -> list[Tensor]:
    """Every RoI's loss under ``heads``' box branch, without gradient and without side effects.

    The loss is the one the heads train with ("The loss represents how well the current network
    performs on each RoI", Sec. 4.1, computed by a read-only copy of the trained RoI network,
    Sec. 4.2): Fast R-CNN's classification log loss plus smooth-L1 box loss, with the heads'
    ``box_loss_beta`` (see ``SamplingRoIHeads``). ``predict_rois`` gives it with the rest of what
    the pass predicts; see there for the arguments.

    Returns:
        Per image, ``[N_i]``: classification log loss plus the foreground smooth-L1 box loss, the
        two terms of ``fastrcnn_loss`` before reduction.
    """
    return [
        p.loss
        for p in _read_only_pass(
            heads,
            features,
            proposals,
            image_shapes,
            gt_boxes,
            assignments,
            score_dtype=score_dtype,
            box_loss_beta=box_loss_beta,
            predictions=False,
        )
    ]


@torch.no_grad()
def predict_rois(
    heads: RoIHeads,
    features: dict[str, Tensor],
    proposals: Sequence[Tensor],
    image_shapes: Sequence[tuple[int, int]],
    gt_boxes: Sequence[Tensor],
    assignments: Sequence[Assignment],
    *,
    score_dtype: torch.dtype | str | None = None,
    box_loss_beta: float = TORCHVISION_BOX_BETA,
) -> list[RoIScores]:
    """Every RoI's loss, scores and predicted box under ``heads``' box branch, read-only.

    What samplers with ``needs_scores`` receive (PISA's ISR-N): beside the loss of ``score_rois``,
    the classification loss alone, the largest foreground softmax probability, its class, and the
    box predicted for that class (its deltas decoded from the RoI by the heads' box coder, not
    clipped: as MMDetection's ``ScoreHLRSampler`` decodes them).

    The RoIs are pooled and scored in slices of ``READ_ONLY_SLICE_BYTES`` of pooled features: the
    pass over thousands of RoIs never holds all their features at once. Each part of a slice's
    pooling (``pool_parts``: a pyramid level's share of one thread) goes through the box head as
    it is, so pooled features are never copied into one tensor. The slices follow the raster
    order of the RoIs, so that each pools RoIs near each other (cache locality; see ``_pool``);
    the results come back in the proposals' order. Only the head's outputs are kept per slice;
    the losses and predictions are computed from them once, over all RoIs, and the head's weights
    are cast to ``score_dtype`` once per pass.

    Args:
        heads: torchvision's ``RoIHeads`` (or ``SamplingRoIHeads``).
        features: feature maps by name, ``[B, C, H_l, W_l]`` each.
        proposals: per image, ``[N_i, 4]`` in the transformed image's pixels.
        image_shapes: per image, ``(H, W)`` after the transform.
        gt_boxes: per image, ``[G_i, 4]``.
        assignments: per image, the proposals' assignment.
        score_dtype: run the box head under autocast in this type (``torch.bfloat16`` or
            ``torch.float16``; ``"auto"``: see ``resolve_score_dtype``); the losses and
            probabilities are still computed in the pooled features' type, and returned in
            float32. ``None``: the caller's precision.
        box_loss_beta: the smooth-L1's beta (torchvision: 1/9; Fast R-CNN: 1).

    Returns:
        Per image, one ``RoIScores`` for its ``N_i`` proposals.
    """
    return _read_only_pass(
        heads,
        features,
        proposals,
        image_shapes,
        gt_boxes,
        assignments,
        score_dtype=score_dtype,
        box_loss_beta=box_loss_beta,
        predictions=True,
    )


def _read_only_pass(
    heads: RoIHeads,
    features: dict[str, Tensor],
    proposals: Sequence[Tensor],
    image_shapes: Sequence[tuple[int, int]],
    gt_boxes: Sequence[Tensor],
    assignments: Sequence[Assignment],
    *,
    score_dtype: torch.dtype | str | None,
    box_loss_beta: float,
    predictions: bool,
) -> list[RoIScores]:
    """``predict_rois``; with ``predictions=False`` only ``loss`` is filled (the others empty)."""
    targets_reg = heads.box_coder.encode(
        [matched_boxes(p, g, a) for p, g, a in zip(proposals, gt_boxes, assignments, strict=True)],
        list(proposals),
    )
    rois = to_rois(list(proposals))
    labels = torch.cat([a.gt_class for a in assignments])
    targets_reg = torch.cat(targets_reg)
    score_dtype = resolve_score_dtype(score_dtype, rois.device)
    feature = next(iter(features.values()))
    rows = _slice_rows(heads.box_roi_pool, feature, rois.shape[0])
    # Only the box head's outputs are kept, a few numbers per RoI, in the pooled features' type
    # (their own under autocast: float16 / bfloat16 ones are cast up to it, exactly); the losses
    # and predictions are computed from them once, over all RoIs, after the loop.
    class_logits: Tensor | None = None
    box_regression = feature.new_empty(0)
    with _scoring_precision(rois.device.type, score_dtype):
        for part in raster_order(rois).split(rows):
            # Each part of the pooling straight through the box head, so the pooled features
            # are never copied into one tensor.
            shapes = list(image_shapes)
            for index, pooled in pool_parts(heads.box_roi_pool, features, rois[part], shapes):
                which = part if index is None else part[index]
                logits, deltas = run_read_only(
                    heads.box_predictor, run_read_only(heads.box_head, pooled)
                )
                if class_logits is None:
                    class_logits = pooled.new_empty((rois.shape[0], logits.shape[1]))
                    box_regression = pooled.new_empty((rois.shape[0], deltas.shape[1]))
                class_logits[which] = logits.to(pooled.dtype)
                box_regression[which] = deltas.to(pooled.dtype)
    assert class_logits is not None  # the loop pools at least one (possibly empty) part
    cls, box = fastrcnn_roi_losses(
        class_logits, box_regression, labels, targets_reg, beta=box_loss_beta
    )
    # float32 whatever the features' type (under autocast they are float16 / bfloat16): the
    # losses are ranked, and ties made by a coarse type would decide the picks.
    out = {"loss": (cls + box).float()}
    if predictions:
        score, label = class_logits.softmax(-1)[:, 1:].max(-1)
        label = label + 1  # class 0 is the background
        # The class count from the width, not -1, which is ambiguous with no RoIs.
        deltas = box_regression.reshape(rois.shape[0], box_regression.shape[-1] // 4, 4)
        deltas = deltas[torch.arange(rois.shape[0], device=deltas.device), label]
        decoded = heads.box_coder.decode_single(deltas, rois[:, 1:])
        out |= {
            "cls_loss": cls.float(),
            "score": score.float(),
            "label": label,
            "box": decoded.float(),
        }
    else:
        empty = feature.new_empty(0, dtype=torch.float32)
        out |= {
            "cls_loss": empty,
            "score": empty,
            "label": feature.new_empty(0, dtype=torch.int64),
            "box": feature.new_empty((0, 4), dtype=torch.float32),
        }
    sizes = [p.shape[0] for p in proposals]
    split = {
        name: list(values.split(sizes)) if values.shape[0] else [values] * len(sizes)
        for name, values in out.items()
    }
    return [RoIScores(**{name: split[name][i] for name in out}) for i in range(len(sizes))]


@contextlib.contextmanager
def _scoring_precision(device_type: str, dtype: torch.dtype | None) -> Iterator[None]:
    """Autocast to ``dtype`` (nothing for None) with the box head's weights cast once per pass.

    Autocast's cast cache holds a weight's cast by the weight alone, not by type: it is emptied
    on entry, so that an enclosing autocast of another type (float16 AMP around bfloat16
    scoring) cannot hand the head its casts, and on exit, so that the training pass that follows
    under that autocast gets none of these. Emptying it costs an enclosing autocast at most a
    cast it makes again. Without the cache, every part of every slice cast the weights anew.
    """
    if dtype is None:
        yield
        return
    torch.clear_autocast_cache()
    try:
        with torch.autocast(device_type, dtype=dtype, cache_enabled=True):
            yield
    finally:
        torch.clear_autocast_cache()


def _slice_rows(pool: nn.Module, feature: Tensor, total: int) -> int:
    """RoIs per slice of the read-only pass: at most ``READ_ONLY_SLICE_BYTES`` of pooled features,
    in slices of equal size (none of a few RoIs left over, each costing a call of the box head)."""
    size = getattr(pool, "output_size", None)
    if size is None:  # not torchvision's pooler: one slice
        return max(1, total)
    h, w = (size, size) if isinstance(size, int) else size
    rows = max(1, READ_ONLY_SLICE_BYTES // (feature.shape[1] * h * w * feature.element_size()))
    slices = -(-total // rows)  # ceil
    return max(1, -(-total // max(1, slices)))


def rcnn_heads(model: nn.Module) -> RoIHeads | None:
    """``model``'s RoI heads, or None for a detector without them (RetinaNet, FCOS, ATSS)."""
    heads = getattr(model, "roi_heads", None)
    return heads if isinstance(heads, RoIHeads) else None


@contextlib.contextmanager
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
    """The RPN's proposals with its *training* top-n settings (``propose``), without its losses.

    torchvision's RPN keeps more proposals in training (e.g. 2000 after NMS) than at test time
    (1000), and the samplers choose from the training ones.

    Returns:
        Per image, ``[P_i, 4]`` in the transformed images' pixels.
    """
    return propose(rpn, images, features, training=True)[0]


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


def _heads_of(model: nn.Module) -> RoIHeads:
    heads = rcnn_heads(model)
    if heads is None:
        raise ValueError(f"{type(model).__name__} has no RoI heads (Faster / Mask R-CNN needed)")
    return heads


@torch.no_grad()
def roi_batch(
    model: nn.Module,
    images: Sequence[Tensor],
    targets: Sequence[dict[str, Any]],
    *,
    proposals: Sequence[Tensor] | None = None,
    assigner: Assigner | None = None,
) -> RoIBatch:
    """Run a Faster / Mask R-CNN up to its RoI heads' assignment, read-only, in eval mode.

    Args:
        model: a torchvision ``FasterRCNN`` or ``MaskRCNN`` (with or without sampling heads).
        images: per image, ``float [3, H, W]``.
        targets: per image, ``boxes [G, 4]`` and ``labels int64 [G]`` in the image's pixels.
        proposals: per image, ``[P_i, 4]`` in the image's pixels to use instead of the RPN's
            training proposals.
        assigner: labels the RoIs; the heads' own (``heads_assigner``) when None.

    Raises:
        ValueError: ``model`` has no RoI heads.
    """
    heads = _heads_of(model)
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
    boxes = [upcast(b) for b in boxes]  # geometry in float32, never in half, as in training
    gt_boxes = [t["boxes"].to(boxes[0].dtype) for t in resized]
    gt_labels = [t["labels"] for t in resized]
    boxes = heads.add_gt_proposals(boxes, gt_boxes)
    assigner = assigner or heads_assigner(heads)
    return RoIBatch(
        features=features,
        image_sizes=list(image_list.image_sizes),
        original_sizes=original_sizes,
        proposals=boxes,
        gt_boxes=gt_boxes,
        gt_labels=gt_labels,
        assignments=assigner(boxes, gt_boxes, gt_labels),
    )


def roi_predictions(model: nn.Module, batch: RoIBatch) -> list[RoIScores]:
    """Every RoI's ``RoIScores`` (``predict_rois``, with the heads' own ``score_dtype`` and
    ``box_loss_beta``, if any), read-only: what samplers with ``needs_scores`` take.

    Raises:
        ValueError: ``model`` has no RoI heads.
    """
    heads = _heads_of(model)
    with eval_mode(model):
        return predict_rois(
            heads,
            batch.features,
            batch.proposals,
            batch.image_sizes,
            batch.gt_boxes,
            batch.assignments,
            score_dtype=getattr(heads, "score_dtype", None),
            box_loss_beta=getattr(heads, "box_loss_beta", TORCHVISION_BOX_BETA),
        )


def roi_losses(
    model: nn.Module,
    batch: RoIBatch,
    *,
    score_dtype: torch.dtype | str | None = "heads",
    box_loss_beta: float | None = None,
) -> list[Tensor]:
    """Every RoI's loss (classification log loss + foreground smooth-L1), read-only.

    Args:
        model: a Faster / Mask R-CNN.
        batch: from ``roi_batch``.
        score_dtype: the precision of the box head (``score_rois``); ``"heads"`` (default): the
            heads' own ``score_dtype`` (as OHEM scores in training), ``None`` for plain heads.
        box_loss_beta: the smooth-L1's beta; None (default): the heads' own (as they train).

    Returns:
        Per image, ``float [N_i]`` for ``batch.proposals``.

    Raises:
        ValueError: ``model`` has no RoI heads.
    """
    heads = _heads_of(model)
    if score_dtype == "heads":
        score_dtype = getattr(heads, "score_dtype", None)
    with eval_mode(model):
        return score_rois(
            heads,
            batch.features,
            batch.proposals,
            batch.image_sizes,
            batch.gt_boxes,
            batch.assignments,
            score_dtype=score_dtype,
            box_loss_beta=(
                getattr(heads, "box_loss_beta", TORCHVISION_BOX_BETA)
                if box_loss_beta is None
                else box_loss_beta
            ),
        )
