"""The settings a detector builder takes: its own and those it forwards to torchvision.

The builders pass ``**kwargs`` on to torchvision's constructors, and those swallow unknown keys
(``GeneralizedRCNNTransform`` takes ``**kwargs``): a mistyped ``box_detections_per_imgs`` would be
silently ignored. ``forwards_to`` states, on each builder, the constructors it forwards to; the
builder's signature (``inspect.signature``) then lists every setting by name with a type, so that
``build`` refuses an unknown one and the run configuration checks keys and types
(``hardmine.config.settings_of``).

torchvision's detector constructors carry no type hints (FCOS's aside); a setting's type is then
that of its default, or given in ``_HINTS`` where the default does not say it (``None``, or an
``int`` that may also be a list, as ``min_size``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from torch import nn
from torchvision.models._api import WeightsEnum
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator

F = TypeVar("F", bound=Callable[..., Any])

_MODULE = nn.Module | None
#: Types of torchvision's detection settings where the default does not give one.
_HINTS: dict[str, Any] = {
    # One side, or several to pick from at random per training image (multi-scale training).
    "min_size": int | list[int] | None,
    "image_mean": list[float] | None,
    "image_std": list[float] | None,
    "fixed_size": tuple[int, ...] | None,
    "bbox_reg_weights": tuple[float, ...] | None,
    "num_keypoints": int | None,
    "weights_backbone": str | WeightsEnum | None,
    "trainable_backbone_layers": int | None,
    "rpn_anchor_generator": AnchorGenerator | None,
    "anchor_generator": AnchorGenerator | None,
    "proposal_matcher": Matcher | None,
    **dict.fromkeys(
        (
            "rpn_head",
            "box_roi_pool",
            "box_head",
            "box_predictor",
            "mask_roi_pool",
            "mask_head",
            "mask_predictor",
            "keypoint_roi_pool",
            "keypoint_head",
            "keypoint_predictor",
            "head",
        ),
        _MODULE,
    ),
}
#: Parameters a builder always sets itself, never a setting.
_SET_BY_BUILDER = {"self", "backbone", "num_classes", "weights"}


def _hint(parameter: inspect.Parameter, annotations: dict[str, Any]) -> Any:
    if parameter.name in _HINTS:
        return _HINTS[parameter.name]
    hint = annotations.get(parameter.name, parameter.annotation)
    if hint is not inspect.Parameter.empty and not isinstance(hint, str):
        return hint
    default = parameter.default
    if isinstance(default, bool | int | float | str):
        return type(default)
    return Any


def _forwarded(target: Callable[..., Any]) -> list[inspect.Parameter]:
    """The keyword settings ``target`` takes that have a default, as keyword-only parameters."""
    function = target.__init__ if inspect.isclass(target) else target
    try:
        annotations = inspect.get_annotations(function, eval_str=True)
    except (NameError, TypeError):  # an annotation that does not evaluate: go by the defaults
        annotations = {}
    out = []
    for p in inspect.signature(target).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY) or p.default is p.empty:
            continue
        if p.name in _SET_BY_BUILDER or p.name.startswith("_"):
            continue
        out.append(p.replace(kind=p.KEYWORD_ONLY, annotation=_hint(p, annotations)))
    return out


def forwards_to(*targets: Callable[..., Any], exclude: Iterable[str] = ()) -> Callable[[F], F]:
    """Give a builder ``(num_classes, *, weights, ..., **kwargs)`` the signature of what it takes.

    The result's signature is the builder's own parameters, then every keyword setting of
    ``targets`` (in their order, the first mention of a name winning) except ``exclude`` (those
    the builder sets itself), without the ``**kwargs``. The builder itself is unchanged.
    """

    def decorate(builder: F) -> F:
        own = inspect.signature(builder)
        params = [p for p in own.parameters.values() if p.kind is not p.VAR_KEYWORD]
        hints = inspect.get_annotations(builder, eval_str=True)
        params = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in params]
        names = {p.name for p in params} | set(exclude)
        for target in targets:
            for p in _forwarded(target):
                if p.name not in names:
                    params.append(p)
                    names.add(p.name)
        builder.__signature__ = own.replace(parameters=params)  # type: ignore[attr-defined]
        builder.__annotations__ = {p.name: p.annotation for p in params}
        builder.__annotations__["return"] = hints.get("return", own.return_annotation)
        return builder

    return decorate


def check_settings(name: str, builder: Callable[..., Any], settings: Iterable[str]) -> None:
    """Raise unless ``builder``'s signature names every one of ``settings``.

    Raises:
        TypeError: an unknown setting, naming it and the valid ones.
    """
    params = inspect.signature(builder).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(settings) - set(params))
    if unknown:
        valid = sorted(k for k, p in params.items() if p.kind is p.KEYWORD_ONLY)
        raise TypeError(
            f"{name} got unknown setting(s) {', '.join(unknown)}; valid: {', '.join(valid)}"
        )
