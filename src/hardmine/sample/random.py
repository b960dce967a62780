"""Random fg/bg sampling: the Fast R-CNN baseline (Girshick, ICCV 2015), torchvision's semantics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from hardmine.sample.quota import draw, flatten
from hardmine.structures import Assignment, Selection


def sample_random(
    assignments: Sequence[Assignment],
    *,
    num: int = 512,
    pos_fraction: float = 0.25,
    generator: torch.Generator | None = None,
) -> list[Selection]:
    """Draw ``num`` candidates per image uniformly, ``pos_fraction`` of them positive.

    As torchvision's ``BalancedPositiveNegativeSampler``: ``int(num * pos_fraction)`` positives at
    most; negatives make up the rest of ``num`` (so they pad when positives are short); ignored
    candidates are never drawn. One draw over the whole batch.

    Args:
        assignments: one per image.
        num: candidates per image (Fast R-CNN: 128 per image with 2 images; torchvision: 512).
        pos_fraction: at most this fraction positive (Fast R-CNN: 0.25).
        generator: makes the picks reproducible.

    Returns:
        One ``Selection`` per image, weight 1 on the picks.
    """
    flat = flatten(assignments)
    pos, neg = flat.label == 1, flat.label == 0
    num_pos = flat.count(pos).clamp(max=int(num * pos_fraction))  # [B]
    num_neg = flat.count(neg).minimum(num - num_pos)  # [B]
    group = torch.where(pos, 0, torch.where(neg, 1, -1))
    quota = torch.stack([num_pos, num_neg], dim=1)  # [B, 2]
    mask = draw(flat, None, group, quota, max_quota=num, generator=generator)
    return flat.split(mask)


@dataclass(frozen=True)
class RandomSampler:
    """``sample_random`` with its settings, in the ``Sampler`` interface."""

    num: int = 512
    pos_fraction: float = 0.25
    needs_losses: bool = False

    def __call__(
        self,
        boxes: Sequence[Tensor],
        assignments: Sequence[Assignment],
        *,
        losses: Sequence[Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> list[Selection]:
        return sample_random(
            assignments, num=self.num, pos_fraction=self.pos_fraction, generator=generator
        )
