"""A folder of images without annotations: photos known to hold none of the classes.

Bootstrapping (Sung & Poggio; Dalal & Triggs, CVPR 2005) scans such images with the current
detector and keeps its highest-scoring detections as hard negatives; in training they are images
without objects. ``ImageFolder`` is that folder as a dataset of the common interface
(``hardmine.data``): every target has no boxes.

The images are the files under the folder with a common image suffix (``IMAGE_SUFFIXES``, any
case), found recursively; hidden files and folders (a name starting with ``.``) are skipped, and
so are symbolic links to folders (one can lead out of the folder, or round in a loop: ``up -> ..``
listed the same image 41 times, two such links never ended); links to files are taken. They
are known by their path relative to the folder, in POSIX form (``street/0001.jpg``), and ordered
by it: the ``i``-th path gets image id ``first_id + i``. The ids are stable while the folder's
contents are; a hard-negatives file mined on a folder also records the paths
(``hardmine.data.hard_negatives``), and training matches its boxes to images by path, so adding
images to the folder later moves no box to another image.

Every file is decoded before work starts (``hardmine.data.images.check_files``, in threads,
remembered while unchanged), so that an undecodable file is named at once.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from hardmine.data.hard_negatives import HARD_NEGATIVES_KEY, HardNegatives
from hardmine.data.images import ImageFileError, check_files, read_image
from hardmine.errors import ConfigError, DataError

#: File suffixes taken as images (compared without case): what Pillow reads and cameras write.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")

#: The largest ratio of an image's long side to its short side that a folder takes. The detector
#: scales an image so that its long side is at most ``model.max_size`` (256 for the tiny models,
#: 1333 for torchvision's): a 4000x10 strip would get a short side of 0 pixels, which the resize
#: cannot make (a traceback from inside torchvision), and at a ratio of 50 the short side is
#: already about 5 pixels at the tiny models' scale, smaller than one cell of the coarsest
#: feature map, so such an image teaches nothing. It is refused by name when the folder is checked.
MAX_ASPECT_RATIO = 50


def list_images(folder: str | Path) -> list[str]:
    """The image files under ``folder``, recursively, as sorted relative POSIX paths; links to
    folders are not followed (see the module docstring).

    Raises:
        DataError: ``folder`` is not a folder.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder of images")
    found = []
    for current, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES):
                found.append((Path(current) / name).relative_to(root).as_posix())
    return sorted(found)


class ImageFolder(Dataset[tuple[Tensor, dict[str, Any]]]):
    """The images under a folder, each an image without objects (see the module docstring).

    Items are ``(image, target)``: ``image`` ``float32 [3, H, W]`` in [0, 1] (``read_image``:
    EXIF orientation applied), ``target`` with ``boxes`` ``[0, 4]``, ``labels`` ``[0]``,
    ``ignore_boxes`` ``[0, 4]`` and ``image_id``.

    Args:
        folder: the folder.
        categories: the class names of the detector the images are used with (for ``coco_gt``).
        first_id: the image id of the first path; the others follow in path order.
        check_images: decode every file before the dataset is made.

    Attributes:
        root: the folder.
        files: the relative paths, sorted.
        ids: ``files[i]``'s image id, ``first_id + i``.
        categories: as given.
        coco_gt: a COCO dict with the images (``file_name`` the relative path) and no
            annotations.

    Raises:
        DataError: ``folder`` is not a folder, holds no image file, or holds a file that cannot be
            decoded faithfully or whose sides differ more than ``MAX_ASPECT_RATIO`` times
            (named).
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        categories: Sequence[str] = (),
        first_id: int = 1,
        check_images: bool = True,
    ) -> None:
        self.root = Path(folder)
        self.files = list_images(self.root)
        if not self.files:
            raise DataError(
                f"{self.root}: no image files (suffixes {', '.join(IMAGE_SUFFIXES)}) in it or "
                "its subfolders"
            )
        self.ids = [first_id + i for i in range(len(self.files))]
        self.categories = list(categories)
        self._digests: dict[int, str] = {}
        sizes: list[tuple[int, int] | None] = [None] * len(self.files)
        if check_images:
            found = check_files(
                [self.root / f for f in self.files], "image", cache_name=str(self.root.resolve())
            )
            for i, result in enumerate(found):
                if isinstance(result, ImageFileError):
                    raise DataError(str(result)) from result
                long, short = max(result.width, result.height), min(result.width, result.height)
                if long > MAX_ASPECT_RATIO * short:
                    raise DataError(
                        f"{self.root / self.files[i]}: {result.width}x{result.height} pixels, "
                        f"a long side more than {MAX_ASPECT_RATIO} times the short one, which the "
                        "detector cannot scale to a useful size; crop it or move it out of the "
                        "folder"
                    )
                sizes[i] = (result.width, result.height)
        self.coco_gt: dict[str, Any] = {
            "images": [
                {"id": image_id, "file_name": name}
                | ({} if size is None else {"width": size[0], "height": size[1]})
                for image_id, name, size in zip(self.ids, self.files, sizes, strict=True)
            ],
            "annotations": [],
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(self.categories)],
        }

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        image = read_image(self.root / self.files[index])
        target = {
            "boxes": torch.zeros(0, 4),
            "labels": torch.zeros(0, dtype=torch.int64),
            "image_id": self.ids[index],
            "ignore_boxes": torch.zeros(0, 4),
        }
        return image, target

    def path_of(self, image_id: int) -> str:
        """The relative path of ``image_id``."""
        return self.files[image_id - self.ids[0]]

    def digest(self, index: int) -> str:
        """The SHA-256 (hex) of the bytes of ``files[index]``: what a hard-negatives file
        records to tell this folder's image from another folder's of the same name."""
        if index not in self._digests:
            digest = hashlib.sha256()
            with open(self.root / self.files[index], "rb") as file:
                for chunk in iter(lambda: file.read(1 << 20), b""):
                    digest.update(chunk)
            self._digests[index] = digest.hexdigest()
        return self._digests[index]


class NegativeImageMix(Dataset[tuple[Tensor, dict[str, Any]]]):
    """``dataset`` with images of an ``ImageFolder`` joining every epoch as images without
    objects, and their mined boxes as hard negatives.

    ``share`` is the fraction of each epoch's images that come from the folder: an epoch has the
    ``N`` images of ``dataset`` and ``M = round(share * N / (1 - share))`` folder images (so
    ``share`` 0.25 adds one folder image for every three of ``dataset``), shuffled together by the
    training loop's sampler. Which folder images: epoch ``e`` takes positions ``e * M`` to
    ``(e + 1) * M - 1`` of an endless sequence of shuffled passes over the folder (pass ``p``
    shuffled from ``(seed, p)``), so every folder image is seen as often as any other, one pass
    after another, whatever ``M`` is; the same seed and epoch give the same images, which a
    resumed run needs. The training loop calls ``set_epoch`` before each epoch's loader.

    Items ``0 .. N - 1`` are ``dataset``'s, the rest folder images (targets as ``ImageFolder``'s).
    With ``mined``, a folder image's target also has ``hard_negatives``: the boxes mined on the
    image with the same relative path (none for an image not mined).

    Args:
        dataset: the training set.
        folder: the images without objects; their ids must not be ``dataset``'s.
        share: in ``[0, 1)``.
        seed: shuffles the passes over the folder.
        mined: hard negatives mined on a folder (file version 2), matched by path.

    Raises:
        ConfigError: ``share`` outside ``[0, 1)``.
        DataError: ``mined`` names paths the folder lacks, or records for an image other bytes
            than the folder's (it was mined on another folder; the first such image is named),
            or is not a folder's.
    """

    def __init__(
        self,
        dataset: Dataset,
        folder: ImageFolder,
        *,
        share: float,
        seed: int = 0,
        mined: HardNegatives | None = None,
    ) -> None:
        if not 0.0 <= share < 1.0:
            raise ConfigError(f"negative_image_share: must be in [0, 1), got {share}")
        self.dataset = dataset
        self.folder = folder
        self.share = share
        self.seed = seed
        self.num_base = len(dataset)  # type: ignore[arg-type]
        self.per_epoch = round(share * self.num_base / (1 - share))
        self.epoch = 0
        self.mined: dict[str, Tensor] | None = None
        if mined is not None:
            if not mined.file_names:
                raise DataError(
                    f"hard negatives mined from {mined.source or 'an unnamed source'} are a "
                    "dataset's (by image id), not a folder's: give them without negative_images"
                )
            by_name = mined.by_file_name()
            unknown = sorted(set(by_name) - set(folder.files))
            if unknown:
                raise DataError(
                    f"hard negatives mined on {mined.folder or 'a folder'} name {len(unknown)} "
                    f"files that {folder.root} lacks (first: {unknown[:3]}); were they mined on "
                    "another folder?"
                )
            index = {name: i for i, name in enumerate(folder.files)}
            for image_id, name in sorted(mined.file_names.items(), key=lambda item: item[1]):
                recorded = mined.digests.get(image_id)
                if recorded is not None and recorded != folder.digest(index[name]):
                    raise DataError(
                        f"{folder.root / name}: not the image mined as {name} on "
                        f"{mined.folder or 'a folder'} (other bytes); were the hard negatives "
                        "mined on another folder, or has the image changed since?"
                    )
            self.mined = {name: m.boxes for name, m in by_name.items()}
        self.coco_gt = getattr(dataset, "coco_gt", None)
        self.categories = getattr(dataset, "categories", folder.categories)

    def set_epoch(self, epoch: int) -> None:
        """Choose the folder images of ``epoch`` (see the class docstring)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_base + self.per_epoch

    def folder_index(self, position: int) -> int:
        """The folder image at ``position`` of the endless sequence of shuffled passes."""
        size = len(self.folder)
        pass_, offset = divmod(position, size)
        order = torch.randperm(
            size, generator=torch.Generator().manual_seed(_pass_seed(self.seed, pass_))
        )
        return int(order[offset])

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        if index < self.num_base:
            return self.dataset[index]
        if not 0 <= index - self.num_base < self.per_epoch:
            raise IndexError(index)
        k = self.folder_index(self.epoch * self.per_epoch + index - self.num_base)
        image, target = self.folder[k]
        if self.mined is not None:
            target[HARD_NEGATIVES_KEY] = self.mined.get(self.folder.files[k], torch.zeros(0, 4))
        return image, target


def _pass_seed(seed: int, pass_: int) -> int:
    """A seed per (run seed, pass) pair, the pairs kept apart."""
    return (seed * 1_000_003 + pass_) % (2**63)
