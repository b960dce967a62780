"""The two records that flow from assigners to samplers to losses, and the interfaces between them.

Both are per image and hold tensors only (no index lists), so the CUDA path needs no host
synchronisation. Boxes are ``xyxy`` in absolute pixels; quality matrices are ``[G, N]``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, Union, get_args, get_origin, runtime_checkable

import torch
from torch import Tensor

IGNORE, NEGATIVE, POSITIVE = -1, 0, 1


@dataclass(frozen=True)
class Assignment:
    """What an assigner decided for each of an image's ``N`` candidates.

    Attributes:
        label: ``int8 [N]``: -1 ignore, 0 negative, 1 positive.
        gt_index: ``int64 [N]``: 0-based index of the matched ground truth where ``label == 1``; the
            best-overlapping ground truth elsewhere (0 when the image has none).
        max_iou: ``float [N]``: IoU with that ground truth (0 when the image has none).
        gt_class: ``int64 [N]``: class of the matched ground truth where positive, 0 (background)
            elsewhere.
    """

    label: Tensor
    gt_index: Tensor
    max_iou: Tensor
    gt_class: Tensor

    @property
    def num_candidates(self) -> int:
        return self.label.shape[0]

    @property
    def positive(self) -> Tensor:
        """``bool [N]``."""
        return self.label == POSITIVE

    @property
    def negative(self) -> Tensor:
        """``bool [N]``."""
        return self.label == NEGATIVE

    @staticmethod
    def empty(num: int, device: torch.device | str | None = None) -> Assignment:
        """All ``num`` candidates negative: the assignment of an image without ground truth."""
        return Assignment(
            label=torch.zeros(num, dtype=torch.int8, device=device),
            gt_index=torch.zeros(num, dtype=torch.int64, device=device),
            max_iou=torch.zeros(num, dtype=torch.float32, device=device),
            gt_class=torch.zeros(num, dtype=torch.int64, device=device),
        )


@dataclass(frozen=True)
class Selection:
    """Which of an image's ``N`` candidates the loss sees, and with what weight.

    Attributes:
        mask: ``bool [N]``: picked candidates.
        weight: ``float [N]``: loss weights; 1 where picked and 0 elsewhere unless the method
            reweights (the overlap sampler's ε).
    """

    mask: Tensor
    weight: Tensor

    @property
    def num_picked(self) -> int:
        return int(self.mask.sum())


@dataclass(frozen=True)
class RoIScores:
    """What the read-only pass predicts for each of an image's ``N`` candidates.

    Given to samplers with ``needs_scores`` (PISA's ISR-N ranks negatives by their scores and the
    boxes the detector predicts from them); computed by the model integration
    (``hardmine.models.read_only.predict_rois``) without gradient.

    Attributes:
        loss: ``float [N]``: classification log loss plus the foreground box loss, what a
            ``needs_losses`` sampler receives as ``losses``.
        cls_loss: ``float [N]``: the classification log loss alone, against the assigned class
            (background for negatives).
        score: ``float [N]``: the largest foreground softmax probability.
        label: ``int64 [N]``: its class (1-based; 0 is the background and never the argmax).
        box: ``float [N, 4]``: the box predicted for that class, its deltas decoded from the
            candidate (not clipped to the image).
    """

    loss: Tensor
    cls_loss: Tensor
    score: Tensor
    label: Tensor
    box: Tensor

    @property
    def num_candidates(self) -> int:
        return self.loss.shape[0]


@runtime_checkable
class Sampler(Protocol):
    """A sampler: per image, from the candidates and their assignment, a ``Selection``.

    ``needs_losses`` samplers (OHEM) also take per-candidate losses, computed by the model
    integration in a read-only pass; they never receive a model. ``mined`` marks, per image, the
    candidates that are offline-mined hard negatives (``hardmine.sample.MinedNegativeSampler``
    guarantees them a share of the picks); samplers that have no use for the losses or the mined
    flags accept and ignore them, so every sampler takes targets with hard negatives.

    Two optional attributes, read with ``getattr`` so that a sampler without them still fits:

    - ``needs_scores: bool``: the sampler also takes ``scores=``, one ``RoIScores`` per image from
      the read-only pass (PISA's ISR-N). It is passed only to samplers that set it.
    - ``pisa_loss``: a ``hardmine.sample.PISALoss`` (or None): loss terms the RoI heads apply in
      the training pass, after the picks (PISA's ISR-P and CARL).

    A sampler that wraps another forwards both (``MinedNegativeSampler`` does).
    """

    needs_losses: bool

    def __call__(
        self,
        boxes: Sequence[Tensor],
        assignments: Sequence[Assignment],
        *,
        losses: Sequence[Tensor] | None = None,
        mined: Sequence[Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> list[Selection]: ...


@runtime_checkable
class Assigner(Protocol):
    """An assigner: per image, from candidates and ground truths, an ``Assignment``.

    ``num_per_level`` gives the candidates per pyramid level (ATSS needs it; max-IoU ignores it).
    """

    def __call__(
        self,
        candidates: Sequence[Tensor],
        gt_boxes: Sequence[Tensor],
        gt_labels: Sequence[Tensor],
        *,
        ignore_boxes: Sequence[Tensor] | None = None,
        num_per_level: Sequence[int] | None = None,
    ) -> list[Assignment]: ...


def settings(component: Any) -> dict[str, Any]:
    """A sampler's or assigner's settings: its dataclass fields by name.

    Every component in ``hardmine.sample`` and ``hardmine.assign`` is a frozen dataclass whose
    fields are its keyword settings, stated once; ``__call__`` forwards them with this, and the run
    configuration reads the same fields.
    """
    return {f.name: getattr(component, f.name) for f in dataclasses.fields(component)}


def check_fields(component: Any) -> None:
    """Raise unless every setting of a sampler / assigner dataclass has its field's type.

    The classes are frozen dataclasses whose fields are typed (``num: int``, ``epsilon: float``,
    ``strategy: Literal[...]``); Python does not enforce the hints, and a value of another type
    would pass the range checks or fail obscurely later (``num=2.5`` slices nothing, the string
    ``"yes"`` is a true ``bool``). An ``int`` is refused where a ``bool`` is meant and vice
    versa; an ``int`` is accepted where a ``float`` is; every ``float`` must be finite
    (``epsilon=inf`` or ``nan`` makes no meaningful weight or threshold). Hints this does not
    model (a ``Protocol`` such as ``Sampler``) are not checked.

    Raises:
        TypeError: a value of the wrong type, naming the setting.
        ValueError: a non-finite float, or a string none of a ``Literal``'s, naming the setting.
    """
    hints = _hints(type(component))
    for f in dataclasses.fields(component):
        if not f.init:
            continue
        value = getattr(component, f.name)
        hint = hints.get(f.name, Any)
        if not _fits(value, hint):
            # A string where one of several strings is meant is a wrong value, not a wrong type.
            options = [a for a in _literals(hint) if type(a) is type(value)]
            error = ValueError if options else TypeError
            raise error(f"{f.name} must be {_hint_name(hint)}, got {value!r}")
        for v in value if isinstance(value, tuple | list) else (value,):
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{f.name} must be finite, got {v}")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fits(value: Any, hint: Any) -> bool:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_fits(value, option) for option in get_args(hint))
    if origin is Literal:
        return any(value == option and type(value) is type(option) for option in get_args(hint))
    if origin is tuple:
        items = get_args(hint)
        if not isinstance(value, tuple | list):
            return False
        if len(items) == 2 and items[1] is Ellipsis:
            return all(_fits(v, items[0]) for v in value)
        return len(value) == len(items) and all(map(_fits, value, items))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True  # a hint not modelled here (a Protocol, Any): trusted


def _literals(hint: Any) -> list[Any]:
    """The options of the ``Literal`` types in ``hint`` (a ``Literal`` or a union with them)."""
    origin = get_origin(hint)
    if origin is Literal:
        return list(get_args(hint))
    if origin in (Union, types.UnionType):
        return [o for a in get_args(hint) for o in _literals(a)]
    return []


def _hint_name(hint: Any) -> str:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_hint_name(a) for a in get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(hint))
    if origin is tuple:
        return "a tuple (" + ", ".join(_hint_name(a) for a in get_args(hint)) + ")"
    if hint is type(None):
        return "None"
    return {bool: "a bool", int: "an int", float: "a number", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )
