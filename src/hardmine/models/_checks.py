"""The wrappers' checks of what they are given: an error that says what to pass instead of an
``AttributeError`` from deep inside the first training step."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision.models.detection.fcos import FCOS
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.retinanet import RetinaNet
from torchvision.models.detection.roi_heads import RoIHeads

from hardmine.structures import Assigner, Sampler

# What each argument takes: the interface, an example and where the classes are named.
_KINDS: dict[str, tuple[type, str, str]] = {
    "sampler": (Sampler, "OHEMSampler()", "hardmine.sample.SAMPLERS"),
    "rpn_sampler": (Sampler, "RandomSampler(num=256)", "hardmine.sample.SAMPLERS"),
    "assigner": (Assigner, "ATSSAssigner(topk=9)", "hardmine.assign.ASSIGNERS"),
}


def require_component(value: Any, argument: str) -> None:
    """Raise unless ``value`` is a sampler / assigner object (``argument`` says which).

    Raises:
        TypeError: a name (``"ohem"``), a class (``OHEMSampler``) or anything else that is not in
            the ``Sampler`` / ``Assigner`` interface.
    """
    interface, example, registry = _KINDS[argument]
    what = "an assigner" if interface is Assigner else "a sampler"
    if isinstance(value, str):
        raise TypeError(
            f"{argument} must be {what} object such as {example}, got the name {value!r}; "
            f"to choose one by name: {registry}[{value!r}]()"
        )
    if isinstance(value, type):
        raise TypeError(
            f"{argument} must be {what} object, got the class {value.__name__}; "
            f"pass an instance: {value.__name__}()"
        )
    if not isinstance(value, interface):
        raise TypeError(
            f"{argument} must be {what} object such as {example} (hardmine.structures."
            f"{interface.__name__}), got {type(value).__name__}"
        )


def require_generator(value: Any) -> None:
    """Raise unless ``value`` is a ``torch.Generator`` or None (a seed such as ``1`` would fail at
    the first training step, inside ``torch.randperm``, naming no argument).

    Raises:
        TypeError: naming ``generator`` and what to pass instead.
    """
    if value is not None and not isinstance(value, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(value).__name__} "
            f"{value!r}; for a seed: torch.Generator().manual_seed(seed)"
        )


def require_rcnn(model: Any) -> None:
    """Raise unless ``model`` is a torchvision R-CNN with ``RoIHeads``.

    Raises:
        TypeError: a RetinaNet / FCOS (they take an assigner, ``with_assigner``) or another object.
    """
    if isinstance(model, GeneralizedRCNN) and isinstance(
        getattr(model, "roi_heads", None), RoIHeads
    ):
        return
    if isinstance(model, RetinaNet | FCOS):
        raise TypeError(
            f"with_sampler takes a torchvision Faster / Mask / Keypoint R-CNN, got "
            f"{type(model).__name__}, which trains on every anchor (focal loss) and samples "
            "nothing; give it an assigner instead: with_assigner(model, ATSSAssigner(topk=9))"
        )
    name = type(model).__name__ if isinstance(model, nn.Module) else repr(model)
    raise TypeError(
        "with_sampler takes a torchvision Faster / Mask / Keypoint R-CNN (a GeneralizedRCNN "
        f"with RoIHeads), got {name}"
    )
