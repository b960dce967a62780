"""Datasets in one interface, for training and for COCO AP.

A dataset is a ``torch.utils.data.Dataset`` of ``(image, target)``:

- ``image``: ``float32 [3, H, W]`` in [0, 1];
- ``target["boxes"]``: ``float32 [K, 4]`` xyxy, absolute pixels;
- ``target["labels"]``: ``int64 [K]`` in ``1..C`` (0 is background);
- ``target["image_id"]``: ``int``, the image's id in ``coco_gt``;
- ``target["ignore_boxes"]``: ``float32 [M, 4]`` regions (COCO ``iscrowd``) that count as neither
  positive nor negative, ``[0, 4]`` when there are none;
- ``target["masks"]``: ``uint8 [K, H, W]``, only when the dataset was made ``with_masks``;
- ``target["hard_negatives"]``: ``float32 [M, 4]`` offline-mined boxes, only in a
  ``HardNegativeDataset`` (or for the folder images of a ``NegativeImageMix``).

and it has ``categories: list[str]`` (label ``i + 1`` is ``categories[i]``) and ``coco_gt``, a
COCO instances dict whose ``category_id`` is the label, built once and used for AP.

Image files are read by ``read_image`` (``hardmine.data.images``): EXIF orientation applied,
16-bit greyscale scaled, transparency composited over ``TRANSPARENT_BACKGROUND``, anything that
cannot be decoded faithfully refused by name (``ImageFileError``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hardmine.data.coco import (
    CocoDataset,
    CocoFormatError,
    coco_gt_of,
    pennfudan_split,
    write_coco,
)
from hardmine.data.folder import IMAGE_SUFFIXES, ImageFolder, NegativeImageMix, list_images
from hardmine.data.hard_negatives import (
    HARD_NEGATIVES_KEY,
    HardNegativeDataset,
    HardNegatives,
    HardNegativesFormatError,
    MinedBoxes,
    load_hard_negatives,
    save_hard_negatives,
    with_hard_negatives,
)
from hardmine.data.images import TRANSPARENT_BACKGROUND, ImageFileError, read_image
from hardmine.data.scenes import (
    CLASS_NAMES,
    SPLIT_SEEDS,
    Scene,
    SceneDataset,
    SceneDesign,
    make_scenes,
)


def collate_fn(batch: Sequence[tuple[Any, Any]]) -> tuple[list[Any], list[Any]]:
    """``[(image, target), ...]`` -> ``([image, ...], [target, ...])``, as torchvision takes them.

    Images keep their own sizes: the detector's transform resizes and batches them.
    """
    images, targets = zip(*batch, strict=True) if batch else ((), ())
    return list(images), list(targets)


__all__ = [
    "CLASS_NAMES",
    "HARD_NEGATIVES_KEY",
    "IMAGE_SUFFIXES",
    "SPLIT_SEEDS",
    "TRANSPARENT_BACKGROUND",
    "CocoDataset",
    "CocoFormatError",
    "HardNegativeDataset",
    "HardNegatives",
    "HardNegativesFormatError",
    "ImageFileError",
    "ImageFolder",
    "MinedBoxes",
    "NegativeImageMix",
    "Scene",
    "SceneDataset",
    "SceneDesign",
    "coco_gt_of",
    "collate_fn",
    "list_images",
    "load_hard_negatives",
    "make_scenes",
    "pennfudan_split",
    "read_image",
    "save_hard_negatives",
    "with_hard_negatives",
    "write_coco",
]
