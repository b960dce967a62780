"""Random fg/bg sampling: the Fast R-CNN baseline (Girshick, ICCV 2015), torchvision's semantics,
and the label-blind random sampling of the OHEM paper's "removing this ratio" experiment."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from hardmine._host import host_tensor
from hardmine.sample.quota import check_call, draw_uniform, flatten
from hardmine.structures import NEGATIVE, POSITIVE, Assignment, Selection, check_fields, settings


@dataclass(frozen=True)
class RandomSampler:
    """``sample_random`` as a ``Sampler``; its fields are the settings (see there)."""

    num: int = 512
    pos_fraction: float | None = 0.25
    needs_losses: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_fields(self)
        check_random_settings(num=self.num, pos_fraction=self.pos_fraction)

    def __call__(
        self,
        boxes: Sequence[Tensor],
        assignments: Sequence[Assignment],
        *,
        losses: Sequence[Tensor] | None = None,
        mined: Sequence[Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> list[Selection]:
        check_call(boxes, assignments, generator)
        return sample_random(assignments, **settings(self), generator=generator)


def check_random_settings(*, num: int, pos_fraction: float | None) -> None:
    """Raise ``ValueError`` naming the first setting of ``sample_random`` out of its range."""
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if pos_fraction is not None and not 0.0 <= pos_fraction <= 1.0:
        raise ValueError(f"pos_fraction must be in [0, 1] or None, got {pos_fraction}")


def sample_random(
    assignments: Sequence[Assignment],
    *,
    num: int = RandomSampler.num,
    pos_fraction: float | None = RandomSampler.pos_fraction,
    generator: torch.Generator | None = None,
) -> list[Selection]:
    """Draw ``num`` candidates per image uniformly, ``pos_fraction`` of them positive.

    As torchvision's ``BalancedPositiveNegativeSampler``: ``int(num * pos_fraction)`` positives at
    most; negatives make up the rest of ``num`` (so they pad when positives are short); ignored
    candidates are never drawn. On the CPU the draw is torchvision's own too (one ``randperm`` per
    image and group, ``quota.draw_uniform``): from the same generator state, the same picks. On
    CUDA it is one draw over the whole batch by random keys, without host synchronisation: the
    same distribution, another stream.

    ``pos_fraction=None`` draws ``num`` uniformly from the positives and negatives together,
    whatever their labels: the OHEM paper's "Removing this ratio (i.e. randomly sampling RoIs)
    ... decreases accuracy by ~3 points mAP" (Shrivastava et al., CVPR 2016, Sec. 3.1), the
    baseline against which OHEM "can remove this ratio hyperparameter with no ill effect".

    Args:
        assignments: one per image.
        num: candidates per image (Fast R-CNN: B = 128 RoIs over N = 2 images, so 64 per image;
            torchvision: 512).
        pos_fraction: at most this fraction positive (Fast R-CNN: 0.25); None: no ratio.
        generator: makes the picks reproducible.

    Returns:
        One ``Selection`` per image, weight 1 on the picks.

    Example:
        One positive, two negatives and an ignored candidate; four picks, a quarter positive:
        the positive, both negatives (they pad the positives' shortfall), never the ignored one.

        >>> import torch
        >>> from hardmine.sample.random import sample_random
        >>> from hardmine import assign_max_iou
        >>> gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
        >>> boxes = [[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 40], [0, 0, 10, 22]]
        >>> boxes = torch.tensor(boxes, dtype=torch.float32)
        >>> (a,) = assign_max_iou([boxes], [gt], [torch.tensor([1])], neg_thr=(0.0, 0.4))
        >>> a.label.tolist()
        [1, 0, 0, -1]
        >>> sample_random([a], num=4, pos_fraction=0.25)[0].mask.tolist()
        [True, True, True, False]
    """
    check_random_settings(num=num, pos_fraction=pos_fraction)
    flat = flatten(assignments)
    if pos_fraction is None:  # label-blind: one group of every candidate not ignored
        member = (flat.label >= 0)[None]  # [1, N]
        return flat.split(draw_uniform(flat, member, caps=[num], total=num, generator=generator))
    labels = host_tensor([[POSITIVE], [NEGATIVE]], flat.device, torch.int8)
    member = flat.label[None] == labels  # [2, N]: positives, negatives
    caps = [int(num * pos_fraction), num]
    return flat.split(draw_uniform(flat, member, caps=caps, total=num, generator=generator))
