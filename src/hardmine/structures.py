"""The two records that flow from assigners to samplers to losses, and the interfaces between them.

Both are per image and hold tensors only (no index lists), so the CUDA path needs no host
synchronisation. See DESIGN.md, "Conventions".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

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
