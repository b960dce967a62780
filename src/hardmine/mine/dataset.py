"""A training set whose targets carry the hard negatives mined on it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor
from torch.utils.data import Dataset, Subset

from hardmine.mine.file import HardNegatives, load_hard_negatives
from hardmine.mine.sampler import TARGET_KEY


def coco_gt_of(dataset: Dataset) -> dict[str, Any] | None:
    """The ``coco_gt`` of a dataset, looking through ``Subset`` wrappers; None without one."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return getattr(dataset, "coco_gt", None)


class HardNegativeDataset(Dataset[tuple[Tensor, dict[str, Any]]]):
    """``dataset`` with each target's mined boxes under ``"hard_negatives"``.

    ``target["hard_negatives"]`` is ``float32 [M, 4]`` xyxy in the image's pixels, ``[0, 4]`` for
    an image without any. The R-CNN models of ``hardmine.models`` resize it with the image and
    append the boxes to the RoI candidates (``hardmine.mine.sampler.append_hard_negatives``).

    Args:
        dataset: a dataset of the common interface (``hardmine.data``).
        hard_negatives: the mined boxes, by image id.

    Raises:
        ValueError: the file names image ids that ``dataset``'s ``coco_gt`` does not have (it
            was mined on another dataset).
    """

    def __init__(self, dataset: Dataset, hard_negatives: HardNegatives) -> None:
        coco_gt = coco_gt_of(dataset)
        if coco_gt is not None:
            unknown = sorted(set(hard_negatives.images) - {im["id"] for im in coco_gt["images"]})
            if unknown:
                raise ValueError(
                    f"hard negatives mined from {hard_negatives.source or 'an unnamed source'} "
                    f"name {len(unknown)} image ids this dataset lacks (first: {unknown[:5]}); "
                    "were they mined on another dataset?"
                )
        self.dataset = dataset
        self.hard_negatives = hard_negatives

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        image, target = self.dataset[index]
        target = dict(target)  # the wrapped dataset's dict stays as it was
        target[TARGET_KEY] = self.hard_negatives.boxes_of(int(target["image_id"]))
        return image, target


def with_hard_negatives(dataset: Dataset, path: str | Path | None) -> Dataset:
    """``dataset`` with the hard negatives of the file at ``path``; ``dataset`` itself for None.

    Raises:
        HardNegativesFormatError: the file is unreadable or malformed.
        ValueError: it was mined on another dataset.
    """
    return dataset if path is None else HardNegativeDataset(dataset, load_hard_negatives(path))
