"""torchvision's detection transform, taught to resize hardmine's extra box targets too."""

from __future__ import annotations

from torch import Tensor
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes

#: Target entries holding ``[M, 4]`` boxes in image pixels besides ``boxes``: ignore regions
#: (crowd annotations) and offline-mined hard negatives.
EXTRA_BOX_KEYS = ("ignore_boxes", "hard_negatives")


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
    """``targets[i][key]`` per image, ``[0, 4]`` where an image has none: ``float [M_i, 4]``."""
    return [t.get(key, like.new_zeros(0, 4)).to(like.dtype) for t in targets]
