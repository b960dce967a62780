"""torchvision's detection transform, taught to resize hardmine's extra box targets too, and the
extra boxes' way into the models: ignore regions and offline-mined hard negatives."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes

from hardmine.boxes import upcast
from hardmine.data.hard_negatives import HARD_NEGATIVES_KEY

#: Target entries holding ``[M, 4]`` boxes in image pixels besides ``boxes``: ignore regions
#: (crowd annotations) and offline-mined hard negatives.
EXTRA_BOX_KEYS = ("ignore_boxes", HARD_NEGATIVES_KEY)


class BoxKeysTransform(GeneralizedRCNNTransform):
    """``GeneralizedRCNNTransform`` that also resizes the ``EXTRA_BOX_KEYS`` of a target.

    torchvision resizes only ``boxes`` (and masks, keypoints), so without this an ignore region
    would stay in the original image's pixels while the proposals live in the resized image's.
    """

    def resize(
        self, image: Tensor, target: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        before = image.shape[-2:]
        image, target = super().resize(image, target)
        if target is not None:
            for key in EXTRA_BOX_KEYS:
                if key in target:
                    target[key] = resize_boxes(target[key], before, image.shape[-2:])
        return image, target


def with_box_keys(transform: GeneralizedRCNNTransform) -> BoxKeysTransform:
    """A ``BoxKeysTransform`` with ``transform``'s settings (it holds no weights)."""
    out = BoxKeysTransform(
        transform.min_size,
        transform.max_size,
        transform.image_mean,
        transform.image_std,
        size_divisible=transform.size_divisible,
        fixed_size=transform.fixed_size,
        _skip_resize=transform._skip_resize,
    )
    out.train(transform.training)
    return out


def target_boxes(targets: list[dict[str, Tensor]], key: str, like: Tensor) -> list[Tensor]:
    """``targets[i][key]`` per image, ``[0, 4]`` where an image has none: ``float [M_i, 4]`` in
    ``like``'s dtype, ``float32`` for a half-precision one (boxes are never rounded to half)."""
    dtype = upcast(like[:0]).dtype
    return [t.get(key, like.new_zeros(0, 4)).to(dtype) for t in targets]


def append_hard_negatives(
    proposals: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]]
) -> tuple[list[Tensor], list[Tensor] | None]:
    """Each image's offline-mined boxes appended after its RoI candidates.

    The boxes come from ``targets[i][HARD_NEGATIVES_KEY]``, in the pixels of the image the heads
    see (``BoxKeysTransform`` resizes them with the image, as it does ``boxes``).

    Args:
        proposals: ``float [N_i, 4]`` per image (proposals and ground-truth copies).
        targets: per image; ``HARD_NEGATIVES_KEY``: ``float [M_i, 4]`` xyxy, or absent for none.

    Returns:
        The candidates ``[N_i + M_i, 4]`` and, per image, ``bool [N_i + M_i]`` true for the mined
        ones (the ``Sampler`` protocol's ``mined``); the proposals unchanged and ``None`` when no
        target carries hard negatives.
    """
    if not any(HARD_NEGATIVES_KEY in t for t in targets):
        return list(proposals), None
    candidates, mined = [], []
    for boxes, target in zip(proposals, targets, strict=True):
        extra = target.get(HARD_NEGATIVES_KEY, boxes.new_zeros(0, 4)).to(boxes.dtype)
        candidates.append(torch.cat([boxes, extra]))
        flags = torch.zeros(boxes.shape[0] + extra.shape[0], dtype=torch.bool, device=boxes.device)
        flags[boxes.shape[0] :] = True
        mined.append(flags)
    return candidates, mined
