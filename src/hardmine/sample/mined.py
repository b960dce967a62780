"""Mined hard negatives in training, with a guaranteed share of the negative picks.

The RoI heads append each image's offline-mined boxes after its proposals and ground-truth copies
(``hardmine.models``) and tell the sampler which candidates they are through the ``Sampler``
protocol's ``mined`` flags. Every sampler accepts them; ``MinedNegativeSampler`` wraps any sampler
to guarantee the mined boxes a share of the negative picks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hardmine.sample.quota import check_call, fill_shortfall, flatten
from hardmine.structures import (
    IGNORE,
    NEGATIVE,
    Assignment,
    RoIScores,
    Sampler,
    Selection,
    check_fields,
)


def check_mined_settings(*, share: float) -> None:
    """Raise ``ValueError`` unless ``share`` (of ``sample_with_mined``) lies in ``[0, 1]``."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1], got {share}")


def sample_with_mined(
    base: Sampler,
    boxes: Sequence[Tensor],
    assignments: Sequence[Assignment],
    mined: Sequence[Tensor],
    *,
    share: float = 0.25,
    losses: Sequence[Tensor] | None = None,
    scores: Sequence[RoIScores] | None = None,
    generator: torch.Generator | None = None,
) -> list[Selection]:
    """Let ``base`` pick, then give ``share`` of its negative picks to mined boxes.

    1. ``base`` picks from all candidates except the mined *negatives*, which it sees as ignored.
       Mined boxes the assigner labels positive or ignored stay as it says (ground truths may
       have changed since mining), so ``base`` treats them like any other candidate.
    2. Its negative picks per image, ``Q``, are the negative quota: it is whatever the base
       sampler's rule gives (random: ``num`` minus the positives, when there are enough
       negatives; OHEM: the negatives among the ``num`` hardest).
    3. ``m = min(floor(share * Q), mined negatives)`` of the base's negative picks are dropped,
       uniformly, and ``m`` mined negatives are drawn uniformly in their place, weight 1.

    So the counts of positives and negatives are the base sampler's, and ``m`` of the negatives
    are mined. The uniform drop keeps the base's choice among the rest unbiased for the samplers
    that draw; for OHEM it drops some hard examples rather than the least hard, which it cannot
    tell from its ``Selection``. One draw for the batch, no loop over images.

    Args:
        base: the sampler for everything but the mined share.
        boxes: ``float [N_i, 4]`` candidates per image.
        assignments: one per image.
        mined: ``bool [N_i]`` per image, true for the appended mined boxes.
        share: fraction of the negative quota guaranteed to mined boxes, in ``[0, 1]``.
        losses: per-candidate losses, passed to ``base``.
        scores: the read-only pass's ``RoIScores``, passed to ``base`` (when given: a base with
            ``needs_scores``, PISA, whose weights then hold for the negatives it keeps).
        generator: makes the picks reproducible.

    Returns:
        One ``Selection`` per image.

    Raises:
        ValueError: ``share`` outside ``[0, 1]``, or ``mined`` sizes that disagree.

    Example:
        A positive, three negatives and two mined boxes; random sampling picks the positive and
        three negatives, and half the negative quota (one pick) goes to a mined box.

        >>> import torch
        >>> from hardmine.sample.mined import sample_with_mined
        >>> from hardmine import RandomSampler, assign_max_iou
        >>> gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
        >>> boxes = [[0, 0, 10, 10]] + [[20 * k, 20, 20 * k + 10, 30] for k in range(5)]
        >>> boxes = torch.tensor(boxes, dtype=torch.float32)
        >>> (a,) = assign_max_iou([boxes], [gt], [torch.tensor([1])])
        >>> mined = torch.tensor([False, False, False, False, True, True])
        >>> (s,) = sample_with_mined(RandomSampler(num=4), [boxes], [a], [mined], share=0.5)
        >>> int(s.mask.sum()), bool(s.mask[0]), int(s.mask[4:].sum())
        (4, True, 1)
    """
    check_mined_settings(share=share)
    flat = flatten(assignments)
    is_mined = flat.cat(mined, "mined")
    hidden = is_mined & (flat.label == NEGATIVE)  # [N]
    visible = [
        Assignment(
            label=torch.where(h, IGNORE, a.label).to(torch.int8),
            gt_index=a.gt_index,
            max_iou=a.max_iou,
            gt_class=a.gt_class,
        )
        for a, h in zip(assignments, hidden.split(flat.sizes), strict=True)
    ]
    extra = {} if scores is None else {"scores": scores}
    selections = base(boxes, visible, losses=losses, generator=generator, **extra)
    base_mask = torch.cat([s.mask for s in selections])
    base_weight = torch.cat([s.weight for s in selections])
    base_neg = base_mask & (flat.label == NEGATIVE) & ~hidden  # [N]
    quota = flat.count(base_neg)  # [B]
    num_mined = torch.minimum((quota * share).floor().long(), flat.count(hidden))  # [B]
    nothing = torch.zeros_like(hidden)
    drop = fill_shortfall(flat, nothing, base_neg, num_mined, generator=generator)
    add = fill_shortfall(flat, nothing, hidden, num_mined, generator=generator)
    mask = (base_mask & ~drop) | add
    weight = torch.where(add, 1.0, torch.where(drop, 0.0, base_weight)).to(base_weight.dtype)
    return flat.split(mask, weight)


@dataclass(frozen=True)
class MinedNegativeSampler:
    """``sample_with_mined`` around any sampler, as a ``Sampler``.

    Without ``mined`` (a batch from a dataset without hard negatives) it is ``base``.

    Attributes:
        base: picks everything but the mined share.
        share: fraction of the negative quota guaranteed to mined boxes.
    """

    base: Sampler
    share: float = 0.25

    def __post_init__(self) -> None:
        check_fields(self)
        check_mined_settings(share=self.share)

    @property
    def needs_losses(self) -> bool:
        return self.base.needs_losses

    @property
    def needs_scores(self) -> bool:
        return getattr(self.base, "needs_scores", False)

    @property
    def pisa_loss(self) -> Any:
        """The base's training-pass terms (``PISALoss``), if any."""
        return getattr(self.base, "pisa_loss", None)

    def __call__(
        self,
        boxes: Sequence[Tensor],
        assignments: Sequence[Assignment],
        *,
        losses: Sequence[Tensor] | None = None,
        mined: Sequence[Tensor] | None = None,
        scores: Sequence[RoIScores] | None = None,
        generator: torch.Generator | None = None,
    ) -> list[Selection]:
        check_call(boxes, assignments, generator)
        if mined is None:
            extra = {} if scores is None else {"scores": scores}
            return self.base(boxes, assignments, losses=losses, generator=generator, **extra)
        return sample_with_mined(
            self.base,
            boxes,
            assignments,
            mined,
            share=self.share,
            losses=losses,
            scores=scores,
            generator=generator,
        )
