"""torchvision's detection transform, taught to resize hardmine's extra box targets too, and the
extra boxes' way into the models: ignore regions and offline-mined hard negatives."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes

from hardmine.boxes import check_magnitude, upcast
from hardmine.data.hard_negatives import HARD_NEGATIVES_KEY

#: Target entries holding ``[M, 4]`` boxes in image pixels besides ``boxes``: ignore regions
#: (crowd annotations) and offline-mined hard negatives.
EXTRA_BOX_KEYS = ("ignore_boxes", HARD_NEGATIVES_KEY)
_BOX_KEYS = ("boxes", *EXTRA_BOX_KEYS)


def check_targets(targets: Sequence[Mapping[str, Tensor]], num_classes: int | None) -> None:
    """Raise ``ValueError`` naming the entry, the image and what is expected, for training
    targets that would otherwise fail obscurely later (a NaN ground truth reported as a NaN
    *candidate* once it is copied among the proposals; an ``IndexError`` inside the sampler).

    Per image ``i``: ``boxes`` a finite floating ``[G, 4]`` tensor within
    ``±hardmine.boxes.coordinate_limit``; ``labels`` an integer ``[G]`` tensor of object classes,
    ``1 <= label < num_classes`` (0 is the background, and ``num_classes`` counts it, as the
    detector's own does); ``ignore_boxes`` and ``hard_negatives``, where present, the same as
    ``boxes`` in shape ``[M, 4]``.

    Args:
        targets: per image, as the detector's ``forward`` takes them in training.
        num_classes: the detector's classes including the background; None: not checked.

    Raises:
        ValueError: the first bad entry, e.g. ``targets[1]["labels"]: expected classes in
            [1, 3], got 0``.
    """
    for i, target in enumerate(targets):
        for key in ("boxes", *EXTRA_BOX_KEYS):
            if key not in target and key != "boxes":
                continue
            boxes = target.get(key)
            where = f'targets[{i}]["{key}"]'
            if not isinstance(boxes, Tensor) or not boxes.is_floating_point():
                got = boxes.dtype if isinstance(boxes, Tensor) else type(boxes).__name__
                raise ValueError(f"{where}: expected a floating-point [M, 4] tensor, got {got}")
            if boxes.dim() != 2 or boxes.shape[-1] != 4:
                raise ValueError(f"{where}: expected shape [M, 4] (xyxy), got {list(boxes.shape)}")
            if boxes.numel():  # NaN, infinity, or coordinates whose areas would overflow
                # A plain ValueError: a NonFiniteError in training means that the run diverged.
                largest = float(boxes.detach().abs().amax())
                check_magnitude(largest, boxes.dtype, where, error=ValueError)
        labels = target.get("labels")
        where = f'targets[{i}]["labels"]'
        if labels is None:
            raise ValueError(f"{where}: missing; give an integer tensor of shape [G]")
        if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.dim() != 1:
            got = (
                f"shape {list(labels.shape)} {labels.dtype}"
                if isinstance(labels, Tensor)
                else (type(labels).__name__)
            )
            raise ValueError(f"{where}: expected an integer tensor of shape [G], got {got}")
        if labels.shape[0] != target["boxes"].shape[0]:
            raise ValueError(
                f"{where}: {labels.shape[0]} labels for {target['boxes'].shape[0]} boxes"
            )
        if num_classes is not None and labels.numel():
            low, high = int(labels.min()), int(labels.max())
            if low < 1 or high >= num_classes:
                bad = low if low < 1 else high
                raise ValueError(
                    f"{where}: expected object classes in [1, {num_classes - 1}] (0 is the "
                    f"background; the detector has {num_classes - 1} classes), got {bad}"
                )


class BoxKeysTransform(GeneralizedRCNNTransform):
    """``GeneralizedRCNNTransform`` that also resizes the ``EXTRA_BOX_KEYS`` of a target, and
    checks the targets first (``check_targets``, against ``num_classes`` when set).

    torchvision resizes only ``boxes`` (and masks, keypoints), so without this an ignore region
    would stay in the original image's pixels while the proposals live in the resized image's.
    """

    num_classes: int | None = None

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[Any, list[dict[str, Tensor]] | None]:
        if targets is not None:
            check_targets(targets, self.num_classes)
            # Half-precision boxes in float32 (exactly): torchvision's FCOS computes its
            # centerness target from them, which float16 turns to NaN (bbox_ctrness).
            targets = [
                {k: upcast(v) if k in _BOX_KEYS else v for k, v in t.items()} for t in targets
            ]
        return super().forward(images, targets)

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


def with_box_keys(
    transform: GeneralizedRCNNTransform, num_classes: int | None = None
) -> BoxKeysTransform:
    """A ``BoxKeysTransform`` with ``transform``'s settings (it holds no weights), checking that
    target labels lie in ``[1, num_classes)`` (``num_classes`` counts the background)."""
    out = BoxKeysTransform(
        transform.min_size,
        transform.max_size,
        transform.image_mean,
        transform.image_std,
        size_divisible=transform.size_divisible,
        fixed_size=transform.fixed_size,
        _skip_resize=transform._skip_resize,
    )
    out.num_classes = num_classes
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
