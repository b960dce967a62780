"""The range of every detector setting a run configuration may give, checked before any work.

The settings' types come from the builders' signatures (``_settings.forwards_to``); their ranges
are here, by the setting's name, because torchvision checks none of them: ``min_size 0`` fails
inside the first resize, ``size_divisible 0`` divides by zero in the batching, and an NMS
threshold of 2 is accepted and keeps every box. ``check_model_settings`` is called by ``build``
(a ``ValueError`` naming the setting) and by the run configuration (``model.<key>: ...``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from torchvision.models import ResNet50_Weights
from torchvision.models._api import WeightsEnum
from torchvision.models.detection import (
    FasterRCNN_ResNet50_FPN_Weights,
    FCOS_ResNet50_FPN_Weights,
    MaskRCNN_ResNet50_FPN_Weights,
    RetinaNet_ResNet50_FPN_Weights,
)


class SettingError(ValueError):
    """A detector setting out of its range; ``key`` names it, the message says what is expected.

    Attributes:
        key: the setting, e.g. ``"min_size"``.
        rule: what it must be, e.g. ``"must be at least 1, got 0"``.
    """

    def __init__(self, key: str, rule: str) -> None:
        super().__init__(f"{key} {rule}")
        self.key = key
        self.rule = rule


#: The detectors that can load torchvision's weights, and which.
WEIGHTS: dict[str, type[WeightsEnum]] = {
    "faster_rcnn_r50_fpn": FasterRCNN_ResNet50_FPN_Weights,
    "mask_rcnn_r50_fpn": MaskRCNN_ResNet50_FPN_Weights,
    "retinanet_r50_fpn": RetinaNet_ResNet50_FPN_Weights,
    "fcos_r50_fpn": FCOS_ResNet50_FPN_Weights,
    "atss_fcos_r50_fpn": FCOS_ResNet50_FPN_Weights,  # torchvision's FCOS, with ATSS assignment
}


def _real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _sizes(count: int | None, low: float, *, strict: bool = False) -> Callable[[Any], bool]:
    """A list of ``count`` (any number when None, at least one) finite numbers above ``low``."""

    def ok(value: Any) -> bool:
        if not isinstance(value, list | tuple) or not value:
            return False
        if count is not None and len(value) != count:
            return False
        return all(_real(x) and (x > low if strict else x >= low) for x in value)

    return ok


def _at_least(low: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: _real(v) and v >= low), f"must be at least {low:g}"


def _or_null(rule: tuple[Callable[[Any], bool], str]) -> tuple[Callable[[Any], bool], str]:
    ok, text = rule
    return (lambda v: v is None or ok(v)), f"{text} (or null)"


_FRACTION = ((lambda v: _real(v) and 0 <= v <= 1), "must be in [0, 1]")
_COUNT = _at_least(1)

# By the setting's name: an exact name, or a pattern (``re.fullmatch``) for a family of them.
_POSITIVE = ((lambda v: _real(v) and v > 0), "must be a finite number > 0")
_RULES: tuple[tuple[str, tuple[Callable[[Any], bool], str]], ...] = (
    (
        "min_size",
        (
            (lambda v: _COUNT[0](v) or _sizes(None, 1)(v)),
            "must be at least 1, or a list of sizes of at least 1",
        ),
    ),
    ("max_size", _COUNT),
    ("size_divisible", _COUNT),
    ("fixed_size", _or_null((_sizes(2, 1), "must be two sizes of at least 1"))),
    ("image_mean", _or_null((_sizes(3, -math.inf), "must be 3 finite numbers"))),
    ("image_std", _or_null((_sizes(3, 0, strict=True), "must be 3 numbers > 0"))),
    ("bbox_reg_weights", _or_null((_sizes(4, 0, strict=True), "must be 4 numbers > 0"))),
    (r".*_thresh", _FRACTION),  # NMS, IoU and score thresholds
    (r".*_fraction", _FRACTION),
    (r".*_top_n_(train|test)", _COUNT),
    (r".*detections_per_img", _COUNT),
    (r".*_batch_size_per_image", _COUNT),
    ("topk_candidates", _COUNT),
    ("center_sampling_radius", _at_least(0)),
    ("anchor_scale", _POSITIVE),
    ("box_loss_beta", _or_null(_at_least(0))),  # 0: the L1 loss
    ("trainable_backbone_layers", _or_null(((lambda v: v in range(6)), "must be in 0..5"))),
)


def check_model_settings(name: str, settings: Mapping[str, Any]) -> None:
    """Raise ``SettingError`` (a ``ValueError``) for the first setting of detector ``name`` out of
    its range, or weights it cannot load.

    ``weights``: ``None`` for the detectors without torchvision weights (the tiny ones,
    ``atss_r50_fpn``), else a member of their weights enum by name (``"DEFAULT"``, ``"COCO_V1"``)
    or the enum member itself; ``weights_backbone``: ``None`` or ResNet-50's (``"DEFAULT"``,
    ``"IMAGENET1K_V1"``, ...). Checking a name downloads nothing.

    Raises:
        SettingError: naming the setting and its range.
    """
    for key, value in settings.items():
        if key in ("weights", "weights_backbone"):
            _check_weights(name, key, value)
            continue
        for pattern, (ok, rule) in _RULES:
            if re.fullmatch(pattern, key):
                if not ok(value):
                    raise SettingError(key, f"{rule}, got {value!r}")
                break


def _check_weights(name: str, key: str, value: Any) -> None:
    if value is None:
        return
    enum = ResNet50_Weights if key == "weights_backbone" else WEIGHTS.get(name)
    if enum is None:
        raise SettingError(
            key, f"must be null: {name} has no pretrained weights (those that have: "
            f"{', '.join(WEIGHTS)}), got {value!r}"
        )  # fmt: skip
    try:
        enum.verify(value)
    except (KeyError, ValueError, TypeError):
        raise SettingError(
            key, f"must be null or one of {', '.join(enum.__members__)} ({enum.__name__}), "
            f"got {value!r}"
        ) from None  # fmt: skip
