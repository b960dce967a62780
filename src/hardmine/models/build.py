"""Named detector configurations: tiny ones that train from scratch on a CPU, and the standard ones.

``DETECTORS`` maps each name to a plain builder function ``(num_classes, *, weights, **kwargs)``
whose signature lists every setting it takes, those it forwards to torchvision's constructors too
(``forwards_to``); ``build`` looks the name up, refuses settings the builder does not take and
attaches a sampler or assigner. ``run_settings`` gives what a run configuration may set.
``weights=None`` never downloads anything (nor does any backbone: ``weights_backbone`` defaults
to ``None`` too).
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchvision.models._api import WeightsEnum
from torchvision.models.detection import (
    FCOS,
    FasterRCNN,
    MaskRCNN,
    RetinaNet,
    fasterrcnn_resnet50_fpn,
    fcos_resnet50_fpn,
    maskrcnn_resnet50_fpn,
    retinanet_resnet50_fpn,
)
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.misc import Conv2dNormActivation

from hardmine.assign.atss import ATSSAssigner
from hardmine.models._checks import require_generator
from hardmine.models._losses import TORCHVISION_BOX_BETA
from hardmine.models._ranges import check_model_settings
from hardmine.models._roi_align import GatherMultiScaleRoIAlign
from hardmine.models._settings import check_settings, forwards_to
from hardmine.models._transform import with_box_keys
from hardmine.models.fcos import ATSS_ANCHOR_SCALE, AssignedFCOS
from hardmine.models.retinanet import AssignedRetinaNet, with_assigner
from hardmine.models.roi_heads import with_sampler
from hardmine.sample.random import RandomSampler
from hardmine.structures import Assigner, Sampler

Builder = Callable[..., nn.Module]

_TINY_STRIDES = (8, 16, 32)
_R50_STRIDES = (8, 16, 32, 64, 128)  # P3-P7, RetinaNet's and ATSS's pyramid


class TinyBackbone(nn.Module):
    """Five stride-2 convolutions and a three-level FPN: trains from scratch on a CPU.

    Group norm rather than batch norm, because the tiny configurations train with 1-4 images per
    batch. Output: ``OrderedDict`` ``"0"``, ``"1"``, ``"2"`` = P3, P4, P5 (strides 8, 16, 32),
    ``[B, out_channels, H / s, W / s]`` each.
    """

    def __init__(self, *, out_channels: int = 64, widths: tuple[int, ...] = (16, 32, 32, 64, 64)):
        super().__init__()
        gn = partial(nn.GroupNorm, 8)
        layers, cin = [], 3
        for width in widths:
            layers.append(Conv2dNormActivation(cin, width, stride=2, norm_layer=gn))
            cin = width
        self.stem = nn.Sequential(*layers[:3])  # stride 8
        self.stages = nn.ModuleList(layers[3:])  # strides 16, 32
        self.fpn = FeaturePyramidNetwork(list(widths[2:]), out_channels)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """``x: [B, 3, H, W]`` -> three levels (see the class docstring)."""
        feats = [self.stem(x)]
        for stage in self.stages:
            feats.append(stage(feats[-1]))
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


def _no_weights(name: str, weights: Any) -> None:
    if weights is not None:
        raise ValueError(f"{name} has no pretrained weights; pass weights=None")


def _tiny_rcnn_kwargs(num_classes: int) -> dict[str, Any]:
    """Faster R-CNN settings scaled down: 128-256 px images, 500 proposals, 128 RoIs per image."""
    levels = [str(i) for i in range(len(_TINY_STRIDES))]
    return {
        "min_size": 128,
        "max_size": 256,
        "rpn_anchor_generator": AnchorGenerator(
            tuple((2 * s, 4 * s) for s in _TINY_STRIDES), ((0.5, 1.0, 2.0),) * len(_TINY_STRIDES)
        ),
        "rpn_head": RPNHead(64, 6),
        "rpn_pre_nms_top_n_train": 1000,
        "rpn_post_nms_top_n_train": 500,
        "rpn_pre_nms_top_n_test": 500,
        "rpn_post_nms_top_n_test": 300,
        "box_roi_pool": GatherMultiScaleRoIAlign(levels, 7, 1),
        "box_head": TwoMLPHead(64 * 7 * 7, 256),
        "box_predictor": FastRCNNPredictor(256, num_classes),
        "box_batch_size_per_image": 128,
    }


@forwards_to(FasterRCNN, GeneralizedRCNNTransform)
def faster_rcnn_tiny(num_classes: int, *, weights: Any = None, **kwargs: Any) -> FasterRCNN:
    """Faster R-CNN on ``TinyBackbone`` (three FPN levels, 64 channels, 256-d box head)."""
    _no_weights("faster_rcnn_tiny", weights)
    return FasterRCNN(TinyBackbone(), **(_tiny_rcnn_kwargs(num_classes) | kwargs))


@forwards_to(MaskRCNN, GeneralizedRCNNTransform)
def mask_rcnn_tiny(num_classes: int, *, weights: Any = None, **kwargs: Any) -> MaskRCNN:
    """Mask R-CNN on ``TinyBackbone``, with a two-conv 14x14 mask head."""
    _no_weights("mask_rcnn_tiny", weights)
    levels = [str(i) for i in range(len(_TINY_STRIDES))]
    mask = {
        "mask_roi_pool": GatherMultiScaleRoIAlign(levels, 14, 2),
        "mask_head": MaskRCNNHeads(64, [64, 64], 1),
        "mask_predictor": MaskRCNNPredictor(64, 64, num_classes),
    }
    return MaskRCNN(TinyBackbone(), **(_tiny_rcnn_kwargs(num_classes) | mask | kwargs))


@forwards_to(RetinaNet, GeneralizedRCNNTransform)
def retinanet_tiny(num_classes: int, *, weights: Any = None, **kwargs: Any) -> RetinaNet:
    """RetinaNet on ``TinyBackbone``: RetinaNet's 3 scales x 3 ratios anchors from 2x the stride."""
    _no_weights("retinanet_tiny", weights)
    sizes = tuple(tuple(int(2 * s * 2 ** (i / 3)) for i in range(3)) for s in _TINY_STRIDES)
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    settings = {
        "min_size": 128,
        "max_size": 256,
        "anchor_generator": anchors,
        "head": RetinaNetHead(64, 9, num_classes),
    }
    return RetinaNet(TinyBackbone(), num_classes, **(settings | kwargs))


def _atss_head(channels: int, num_classes: int) -> RetinaNetHead:
    """ATSS's head: one anchor per location, group norm, GIoU box loss (Zhang et al., Sec. 4)."""
    head = RetinaNetHead(channels, 1, num_classes, norm_layer=partial(nn.GroupNorm, 32))
    # torchvision's own RetinaNet v2 selects GIoU through this attribute; there is no argument.
    head.regression_head._loss_type = "giou"
    return head


def _square_anchors(strides: tuple[int, ...], scale: int) -> AnchorGenerator:
    """One square anchor per location, ``scale`` times the level's stride (ATSS: scale 8)."""
    return AnchorGenerator(tuple((scale * s,) for s in strides), ((1.0,),) * len(strides))


@forwards_to(RetinaNet, GeneralizedRCNNTransform, exclude=("anchor_generator", "head"))
def atss_tiny(
    num_classes: int, *, weights: Any = None, anchor_scale: int = 4, **kwargs: Any
) -> AssignedRetinaNet:
    """ATSS on ``TinyBackbone``: RetinaNet with one square anchor per location and ATSS (top 9).

    Anchor scale 4 (``anchor_scale`` strides) instead of the paper's 8: the tiny images are
    128-256 px, where scale 8 would make the P5 anchor (256 px) larger than the image.
    """
    _no_weights("atss_tiny", weights)
    settings = {
        "min_size": 128,
        "max_size": 256,
        "anchor_generator": _square_anchors(_TINY_STRIDES, anchor_scale),
        "head": _atss_head(64, num_classes),
    }
    model = RetinaNet(TinyBackbone(), num_classes, **(settings | kwargs))
    return with_assigner(model, ATSSAssigner(topk=9))


@forwards_to(FCOS, GeneralizedRCNNTransform)
def fcos_tiny(num_classes: int, *, weights: Any = None, **kwargs: Any) -> FCOS:
    """FCOS on ``TinyBackbone``: a location per cell of P3-P5, anchors one stride wide (FCOS's)."""
    _no_weights("fcos_tiny", weights)
    settings = {
        "min_size": 128,
        "max_size": 256,
        "anchor_generator": _square_anchors(_TINY_STRIDES, 1),
        "head": FCOSHead(64, 1, num_classes),
    }
    return FCOS(TinyBackbone(), num_classes, **(settings | kwargs))


@forwards_to(fcos_tiny)
def atss_fcos_tiny(
    num_classes: int, *, weights: Any = None, anchor_scale: float = 4.0, **kwargs: Any
) -> AssignedFCOS:
    """``fcos_tiny`` trained with ATSS (top 9), the assigner's anchors ``anchor_scale`` strides.

    Anchor scale 4 instead of the paper's 8, as ``atss_tiny``: the assigner then sees the same
    anchors as ``atss_tiny``'s and picks the same positives.
    """
    _no_weights("atss_fcos_tiny", weights)
    model = fcos_tiny(num_classes, **kwargs)
    return with_assigner(model, ATSSAssigner(topk=9), anchor_scale=anchor_scale)


@forwards_to(fasterrcnn_resnet50_fpn, FasterRCNN, GeneralizedRCNNTransform)
def faster_rcnn_r50_fpn(
    num_classes: int,
    *,
    weights: Any = None,
    weights_backbone: str | WeightsEnum | None = None,
    **kwargs: Any,
) -> FasterRCNN:
    """torchvision's ``fasterrcnn_resnet50_fpn``, without a pretrained backbone unless asked."""
    return fasterrcnn_resnet50_fpn(
        weights=weights, weights_backbone=weights_backbone, num_classes=num_classes, **kwargs
    )


@forwards_to(maskrcnn_resnet50_fpn, MaskRCNN, GeneralizedRCNNTransform)
def mask_rcnn_r50_fpn(
    num_classes: int,
    *,
    weights: Any = None,
    weights_backbone: str | WeightsEnum | None = None,
    **kwargs: Any,
) -> MaskRCNN:
    """torchvision's ``maskrcnn_resnet50_fpn``, without a pretrained backbone unless asked."""
    return maskrcnn_resnet50_fpn(
        weights=weights, weights_backbone=weights_backbone, num_classes=num_classes, **kwargs
    )


@forwards_to(retinanet_resnet50_fpn, RetinaNet, GeneralizedRCNNTransform)
def retinanet_r50_fpn(
    num_classes: int,
    *,
    weights: Any = None,
    weights_backbone: str | WeightsEnum | None = None,
    **kwargs: Any,
) -> RetinaNet:
    """torchvision's ``retinanet_resnet50_fpn``, without a pretrained backbone unless asked."""
    return retinanet_resnet50_fpn(
        weights=weights, weights_backbone=weights_backbone, num_classes=num_classes, **kwargs
    )


@forwards_to(
    retinanet_resnet50_fpn,
    RetinaNet,
    GeneralizedRCNNTransform,
    exclude=("anchor_generator", "head"),
)
def atss_r50_fpn(
    num_classes: int,
    *,
    weights: Any = None,
    weights_backbone: str | WeightsEnum | None = None,
    **kwargs: Any,
) -> AssignedRetinaNet:
    """ATSS R-50-FPN as in the paper (without its centerness branch): one square anchor of scale 8
    per location on P3-P7, group-norm head, GIoU box loss, ATSS assignment with top 9 per level.
    """
    _no_weights("atss_r50_fpn", weights)
    model = retinanet_resnet50_fpn(
        weights=None,
        weights_backbone=weights_backbone,
        num_classes=num_classes,
        anchor_generator=_square_anchors(_R50_STRIDES, 8),
        head=_atss_head(256, num_classes),
        **kwargs,
    )
    return with_assigner(model, ATSSAssigner(topk=9))


@forwards_to(fcos_resnet50_fpn, FCOS, GeneralizedRCNNTransform)
def fcos_r50_fpn(
    num_classes: int,
    *,
    weights: Any = None,
    weights_backbone: str | WeightsEnum | None = None,
    **kwargs: Any,
) -> FCOS:
    """torchvision's ``fcos_resnet50_fpn``, without a pretrained backbone unless asked."""
    return fcos_resnet50_fpn(
        weights=weights, weights_backbone=weights_backbone, num_classes=num_classes, **kwargs
    )


@forwards_to(fcos_r50_fpn)
def atss_fcos_r50_fpn(
    num_classes: int,
    *,
    weights: Any = None,
    anchor_scale: float = ATSS_ANCHOR_SCALE,
    **kwargs: Any,
) -> AssignedFCOS:
    """FCOS + ATSS as in the ATSS paper: torchvision's FCOS R-50-FPN (P3-P7, group-norm head,
    GIoU and centerness losses) with ATSS assignment, top 9 per level, on anchors of 8 strides.

    The architecture is torchvision's FCOS, so its weights fit: ``weights`` fine-tunes from them.
    """
    model = fcos_r50_fpn(num_classes, weights=weights, **kwargs)
    return with_assigner(model, ATSSAssigner(topk=9), anchor_scale=anchor_scale)


DETECTORS: dict[str, Builder] = {
    "faster_rcnn_tiny": faster_rcnn_tiny,
    "mask_rcnn_tiny": mask_rcnn_tiny,
    "retinanet_tiny": retinanet_tiny,
    "atss_tiny": atss_tiny,
    "fcos_tiny": fcos_tiny,
    "atss_fcos_tiny": atss_fcos_tiny,
    "faster_rcnn_r50_fpn": faster_rcnn_r50_fpn,
    "mask_rcnn_r50_fpn": mask_rcnn_r50_fpn,
    "retinanet_r50_fpn": retinanet_r50_fpn,
    "atss_r50_fpn": atss_r50_fpn,
    "fcos_r50_fpn": fcos_r50_fpn,
    "atss_fcos_r50_fpn": atss_fcos_r50_fpn,
}


def build(
    name: str,
    num_classes: int,
    *,
    sampler: Sampler | None = None,
    assigner: Assigner | None = None,
    generator: torch.Generator | None = None,
    weights: Any = None,
    score_dtype: str | torch.dtype | None = "auto",
    box_loss_beta: float | None = None,
    **kwargs: Any,
) -> nn.Module:
    """The detector ``name`` from ``DETECTORS``, trained with ``sampler`` / ``assigner``.

    Args:
        name: a key of ``DETECTORS``.
        num_classes: including the background class for the R-CNNs (torchvision's convention).
        sampler: R-CNN only: the RoI sampler (``with_sampler``). Without it (and without
            ``assigner``) the model is torchvision's, with its own random sampler.
        assigner: R-CNN: labels the proposals; RetinaNet / FCOS / ATSS: labels the anchors
            (``with_assigner``), replacing ATSS's default ``ATSSAssigner(topk=9)`` (FCOS + ATSS
            keeps its ``anchor_scale``).
        generator: R-CNN: the samplers' generator (``with_sampler``), which makes their picks
            reproducible; torch's global RNG when None. The dense detectors sample nothing.
        weights: torchvision weights for the standard models (``atss_fcos_r50_fpn`` too: it is
            torchvision's FCOS); ``None`` (random init, nothing downloaded) is the only value the
            tiny ones and ``atss_r50_fpn`` accept.
        score_dtype: R-CNN with a loss-ranking sampler (OHEM): the precision of the read-only
            pass (``with_sampler``), ``"bfloat16"`` / ``"float16"`` or the torch dtype;
            ``"auto"`` (default): bfloat16 where the hardware has it, ``None``: the model's own.
        box_loss_beta: R-CNN: the smooth-L1 beta of the RoI heads' box loss, in training and in
            OHEM's ranking alike (``SamplingRoIHeads``); None: torchvision's 1/9. ``1.0`` is Fast
            R-CNN's, the loss of the OHEM paper's detector.
        **kwargs: passed to the builder, e.g. torchvision's ``min_size`` or
            ``box_batch_size_per_image``; ``inspect.signature(DETECTORS[name])`` lists them.

    Raises:
        ValueError: an unknown name, ``num_classes`` below 2, a setting out of its range
            (``hardmine.models._ranges.SettingError``, naming it), or a setting that does not
            apply to the detector.
        TypeError: a setting the builder does not take (torchvision would swallow it).
    """
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; choose from {sorted(DETECTORS)}")
    check_settings(name, DETECTORS[name], kwargs)
    _check_num_classes(name, num_classes)
    require_generator(generator)
    check_model_settings(name, {"weights": weights, "box_loss_beta": box_loss_beta, **kwargs})
    dtype = _score_dtype(score_dtype)
    model = DETECTORS[name](num_classes, weights=weights, **kwargs)
    if isinstance(model, RetinaNet | FCOS):
        if sampler is not None:
            raise ValueError(f"{name} trains on all anchors (focal loss); it takes no sampler")
        if dtype not in (None, "auto"):
            raise ValueError(f"{name} has no read-only pass; score_dtype is for R-CNN with OHEM")
        if box_loss_beta is not None:
            raise ValueError(f"{name} has no RoI heads; box_loss_beta is for R-CNN")
        if assigner is None:  # hardmine's target checks all the same (with_assigner has them)
            model.transform = with_box_keys(model.transform, num_classes)
            return model
        return with_assigner(model, assigner)
    if (
        sampler is None
        and assigner is None
        and dtype in (None, "auto")
        and generator is None
        and box_loss_beta is None
    ):  # torchvision's model, with hardmine's target checks (with_sampler has them)
        model.transform = with_box_keys(model.transform, num_classes)
        return model
    if sampler is None:
        fg_bg = model.roi_heads.fg_bg_sampler
        sampler = RandomSampler(
            num=fg_bg.batch_size_per_image, pos_fraction=fg_bg.positive_fraction
        )
    return with_sampler(
        model,
        sampler,
        assigner=assigner,
        generator=generator,
        score_dtype=dtype,
        box_loss_beta=TORCHVISION_BOX_BETA if box_loss_beta is None else box_loss_beta,
    )


def _check_num_classes(name: str, num_classes: Any) -> None:
    """Raise ``ValueError`` unless ``num_classes`` is an int the detector can have: at least 2
    for an R-CNN (the objects' classes plus torchvision's background, class 0), at least 1 for a
    dense detector (whose classes are the objects' only)."""
    returns = DETECTORS[name].__annotations__.get("return")
    dense = isinstance(returns, type) and issubclass(returns, RetinaNet | FCOS)
    low, what = (1, "object classes") if dense else (2, "object classes plus the background")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < low:
        raise ValueError(
            f"num_classes must be an int of at least {low} for {name} ({what}), got {num_classes!r}"
        )


def _score_dtype(value: str | torch.dtype | None) -> torch.dtype | str | None:
    """``score_dtype`` as a torch dtype: ``None``, ``"auto"``, a half-precision dtype, or its
    name."""
    if value == "auto":
        return value
    if value is None or isinstance(value, torch.dtype):
        dtype = value
    else:
        dtype = getattr(torch, str(value), None)
    if value is not None and dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(
            f"score_dtype must be 'bfloat16', 'float16', 'auto' (or None), got {value!r}"
        )
    return dtype


#: ``build``'s own settings that a run configuration may give beside the builder's.
BUILD_SETTINGS: dict[str, Any] = {
    "score_dtype": Literal["auto", "bfloat16", "float16"] | None,
    "box_loss_beta": float | None,
}


def run_settings(name: str) -> Callable[..., nn.Module]:
    """``build(name, num_classes, **settings)`` with a signature of every setting a run
    configuration's ``model`` section may give: the builder's and ``BUILD_SETTINGS``.

    ``hardmine.config.settings_of`` reads the keys and their types from it.
    """
    builder = DETECTORS[name]

    def build_named(num_classes: int, **settings: Any) -> nn.Module:
        return build(name, num_classes, **settings)

    own = inspect.signature(builder)
    params = list(own.parameters.values())
    params += [
        inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=hint)
        for key, hint in BUILD_SETTINGS.items()
    ]
    build_named.__signature__ = own.replace(parameters=params)  # type: ignore[attr-defined]
    build_named.__annotations__ = {p.name: p.annotation for p in params}
    build_named.__name__ = build_named.__qualname__ = name
    return build_named
