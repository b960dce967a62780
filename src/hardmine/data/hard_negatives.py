"""The hard-negatives file: the false positives mined from one run, per image, as JSON.

::

    {
      "format": "hardmine-hard-negatives",
      "version": 1,
      "source": "runs/round0",                     # the run whose detector was mined
      "settings": {"iou_thr": 0.5, "top_k": 10, "score_thr": null},
      "images": [
        {"image_id": 1, "boxes": [[x1, y1, x2, y2], ...], "scores": [...], "labels": [...]},
        ...
      ]
    }

One entry per image of the mined dataset, those without false positives included. Boxes are xyxy
in the image's pixels; ``labels`` are the classes the detector gave them (for inspection; in
training they are background). The file is written atomically and fully validated when read.

**Version 2** is the file of a mined *folder of images* (``hardmine mine --images FOLDER``,
``hardmine.data.folder``): every entry also has ``"file_name"``, the image's path relative to the
folder, and ``"digest"``, the SHA-256 of the image file's bytes; the document has ``"folder"``,
the folder mined as an absolute path. Training matches these entries to the folder's images by
path, not by id (a folder has no annotation file to fix the ids), and refuses a folder whose image
at a mined path has other bytes (another folder with the same file names; a byte-identical copy
elsewhere is the same data and is taken). An entry without ``"digest"`` (a file written before
digests were recorded) is matched by path alone. A file of a
dataset's images stays version 1, and version 1 is read as before; a hardmine that reads version 1
only refuses version 2 rather than apply folder boxes to a dataset's images by id.

``HardNegativeDataset`` puts each image's mined boxes into its target under ``HARD_NEGATIVES_KEY``;
the R-CNN models of ``hardmine.models`` append them to the RoI candidates as background.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from hardmine._atomic import write_atomic
from hardmine.boxes import coordinate_limit
from hardmine.data.coco import coco_gt_of
from hardmine.errors import DataError

FORMAT = "hardmine-hard-negatives"
VERSION = 1
#: The version of a file whose entries carry ``file_name`` (a mined folder of images).
FOLDER_VERSION = 2
#: The target entry that carries an image's mined boxes, ``float32 [M, 4]`` xyxy pixels.
HARD_NEGATIVES_KEY = "hard_negatives"
#: The largest |coordinate| of a mined box (they are read as float32): beyond it, areas overflow.
COORDINATE_LIMIT = coordinate_limit(torch.float32)


class HardNegativesFormatError(DataError):
    """A hard-negatives file is unreadable or malformed; the message names the file and entry."""


@dataclass(frozen=True)
class MinedBoxes:
    """One image's mined false positives, highest score first.

    Attributes:
        boxes: ``float32 [M, 4]`` xyxy pixels.
        scores: ``float32 [M]``.
        labels: ``int64 [M]`` the classes the detector predicted.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor

    @staticmethod
    def empty() -> MinedBoxes:
        return MinedBoxes(
            boxes=torch.zeros(0, 4),
            scores=torch.zeros(0),
            labels=torch.zeros(0, dtype=torch.int64),
        )


@dataclass(frozen=True)
class HardNegatives:
    """The contents of a hard-negatives file.

    Attributes:
        images: mined boxes by image id (every mined image, possibly with none).
        source: where they were mined from (a run directory).
        settings: the mining settings (``iou_thr``, ``top_k``, ``score_thr``).
        file_names: for a mined folder, each image id's path relative to ``folder``; empty for
            a dataset's images.
        folder: the mined folder (absolute), or ``""``.
        digests: for a mined folder, each image id's file's SHA-256 (hex), where recorded.
    """

    images: Mapping[int, MinedBoxes]
    source: str = ""
    settings: Mapping[str, Any] = field(default_factory=dict)
    file_names: Mapping[int, str] = field(default_factory=dict)
    folder: str = ""
    digests: Mapping[int, str] = field(default_factory=dict)

    def by_file_name(self) -> dict[str, MinedBoxes]:
        """A mined folder's boxes by relative path."""
        return {self.file_names[i]: m for i, m in self.images.items() if i in self.file_names}

    def boxes_of(self, image_id: int) -> Tensor:
        """``float32 [M, 4]``: the mined boxes of ``image_id``; none for an image not mined."""
        mined = self.images.get(image_id)
        return mined.boxes if mined is not None else torch.zeros(0, 4)

    @property
    def num_boxes(self) -> int:
        return sum(m.boxes.shape[0] for m in self.images.values())


def save_hard_negatives(hard_negatives: HardNegatives, path: str | Path) -> Path:
    """Write ``hard_negatives`` as JSON, atomically (``write_atomic``).

    Coordinates are rounded to 1/100 pixel and scores to 5 decimals, which keeps the file small
    and changes no IoU that matters.

    Returns:
        ``path``.
    """
    names = hard_negatives.file_names
    if names and set(names) != set(hard_negatives.images):
        raise ValueError("file_names must name every mined image of a folder, and only those")
    entries = [
        {
            "image_id": image_id,
            **({"file_name": names[image_id]} if names else {}),
            **(
                {"digest": hard_negatives.digests[image_id]}
                if image_id in hard_negatives.digests
                else {}
            ),
            "boxes": [[round(v, 2) for v in box] for box in mined.boxes.tolist()],
            "scores": [round(s, 5) for s in mined.scores.tolist()],
            "labels": mined.labels.tolist(),
        }
        for image_id, mined in sorted(hard_negatives.images.items())
    ]
    document = {
        "format": FORMAT,
        "version": FOLDER_VERSION if names else VERSION,
        "source": hard_negatives.source,
        **({"folder": hard_negatives.folder} if names else {}),
        "settings": dict(hard_negatives.settings),
        "images": entries,
    }
    return write_atomic(path, json.dumps(document) + "\n")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _parse_entry(entry: Any, where: str) -> tuple[int, MinedBoxes]:
    if not isinstance(entry, Mapping):
        raise HardNegativesFormatError(f"{where}: expected an object, got {entry!r}")
    missing = [k for k in ("image_id", "boxes", "scores", "labels") if k not in entry]
    if missing:
        raise HardNegativesFormatError(f"{where}: missing {', '.join(missing)}")
    image_id = entry["image_id"]
    if not _is_int(image_id):
        raise HardNegativesFormatError(f"{where}: image_id must be an integer, got {image_id!r}")
    where = f"{where} (image_id {image_id})"
    boxes, scores, labels = entry["boxes"], entry["scores"], entry["labels"]
    for name, value in (("boxes", boxes), ("scores", scores), ("labels", labels)):
        if not isinstance(value, list):
            raise HardNegativesFormatError(f"{where}: {name} must be a list")
    if not len(boxes) == len(scores) == len(labels):
        raise HardNegativesFormatError(
            f"{where}: {len(boxes)} boxes, {len(scores)} scores and {len(labels)} labels; "
            "expected as many of each"
        )
    for j, box in enumerate(boxes):
        if not (isinstance(box, list) and len(box) == 4 and all(map(_is_number, box))):
            raise HardNegativesFormatError(
                f"{where}: boxes[{j}] must be four finite numbers, got {box!r}"
            )
        if max(map(abs, box)) > COORDINATE_LIMIT:
            raise HardNegativesFormatError(
                f"{where}: boxes[{j}] = {box} reaches beyond ±{COORDINATE_LIMIT:.6g} px, where "
                "the boxes' areas overflow float32"
            )
        if box[2] < box[0] or box[3] < box[1]:
            raise HardNegativesFormatError(
                f"{where}: boxes[{j}] = {box} is not xyxy (x2 < x1 or y2 < y1)"
            )
    if not all(map(_is_number, scores)):
        raise HardNegativesFormatError(f"{where}: scores must be finite numbers")
    if not all(map(_is_int, labels)):
        raise HardNegativesFormatError(f"{where}: labels must be integers")
    return image_id, MinedBoxes(
        boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        scores=torch.tensor(scores, dtype=torch.float32),
        labels=torch.tensor(labels, dtype=torch.int64),
    )


def load_hard_negatives(path: str | Path) -> HardNegatives:
    """Read and validate a file written by ``save_hard_negatives``.

    Raises:
        HardNegativesFormatError: the file is missing, not JSON, of another format or version,
            or has a malformed entry (wrong keys, boxes that are not four finite numbers in xyxy
            order within ±``COORDINATE_LIMIT``, lengths that disagree, a duplicate image id); the
            message names the file and the entry.
    """
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except OSError as error:
        raise HardNegativesFormatError(f"{path}: cannot read: {error.strerror}") from error
    except json.JSONDecodeError as error:
        raise HardNegativesFormatError(f"{path}: not valid JSON: {error}") from error
    if not isinstance(document, Mapping) or document.get("format") != FORMAT:
        raise HardNegativesFormatError(
            f'{path}: not a hard-negatives file (expected "format": "{FORMAT}"; write one '
            "with 'hardmine mine')"
        )
    version = document.get("version")
    if version not in (VERSION, FOLDER_VERSION):
        raise HardNegativesFormatError(
            f"{path}: version {version!r}, this hardmine reads versions {VERSION} and "
            f"{FOLDER_VERSION}"
        )
    entries = document.get("images")
    if not isinstance(entries, list):
        raise HardNegativesFormatError(f'{path}: "images" must be a list')
    settings = document.get("settings", {})
    if not isinstance(settings, Mapping):
        raise HardNegativesFormatError(f'{path}: "settings" must be an object')
    images: dict[int, MinedBoxes] = {}
    file_names: dict[int, str] = {}
    digests: dict[int, str] = {}
    for i, entry in enumerate(entries):
        where = f"{path}: images[{i}]"
        image_id, mined = _parse_entry(entry, where)
        if image_id in images:
            raise HardNegativesFormatError(f"{where}: duplicate image_id {image_id}")
        images[image_id] = mined
        if version == FOLDER_VERSION:
            name = entry.get("file_name")
            if not isinstance(name, str) or not name:
                raise HardNegativesFormatError(
                    f"{where} (image_id {image_id}): a version {FOLDER_VERSION} entry needs "
                    f'"file_name", the image\'s path in the mined folder'
                )
            if name in file_names.values():
                raise HardNegativesFormatError(f"{where}: duplicate file_name {name!r}")
            file_names[image_id] = name
            digest = entry.get("digest")
            if digest is not None:
                if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
                    raise HardNegativesFormatError(
                        f"{where} (image_id {image_id}): digest must be a SHA-256 in hex, got "
                        f"{digest!r}"
                    )
                digests[image_id] = digest
    return HardNegatives(
        images=images,
        source=str(document.get("source", "")),
        settings=settings,
        file_names=file_names,
        folder=str(document.get("folder", "")),
        digests=digests,
    )


class HardNegativeDataset(Dataset[tuple[Tensor, dict[str, Any]]]):
    """``dataset`` with each target's mined boxes under ``HARD_NEGATIVES_KEY``.

    ``target["hard_negatives"]`` is ``float32 [M, 4]`` xyxy in the image's pixels, ``[0, 4]`` for
    an image without any. The R-CNN models of ``hardmine.models`` resize it with the image and
    append the boxes to the RoI candidates (``hardmine.models``).

    Args:
        dataset: a dataset of the common interface (``hardmine.data``).
        hard_negatives: the mined boxes, by image id.
        path: the file they were read from, for the error message.
        box_tolerance: how far, in pixels, a mined box may reach outside its image (as
            ``data.box_tolerance`` allows the dataset's boxes); a detector's boxes never do.

    Raises:
        HardNegativesFormatError: the file names image ids that ``dataset``'s ``coco_gt`` does
            not have, labels beyond its categories (it was mined on another dataset), or a box
            reaching more than ``box_tolerance`` pixels outside its image.
    """

    def __init__(
        self,
        dataset: Dataset,
        hard_negatives: HardNegatives,
        *,
        path: str | Path | None = None,
        box_tolerance: float = 1.0,
    ) -> None:
        if hard_negatives.file_names:
            raise HardNegativesFormatError(
                f"{path or 'hard negatives'}: mined from "
                f"{hard_negatives.source or 'an unnamed source'} on the folder "
                f"{hard_negatives.folder or '(unnamed)'}, they are matched to its images by path: "
                "train with that folder as negative_images (--negative-images)"
            )
        coco_gt = coco_gt_of(dataset)
        if coco_gt is not None:
            where = f"{path}: hard negatives" if path is not None else "hard negatives"
            where += f" mined from {hard_negatives.source or 'an unnamed source'}"
            unknown = sorted(set(hard_negatives.images) - {im["id"] for im in coco_gt["images"]})
            if unknown:
                raise HardNegativesFormatError(
                    f"{where} name {len(unknown)} image ids this dataset lacks (first: "
                    f"{unknown[:5]}); were they mined on another dataset?"
                )
            classes = {c["id"] for c in coco_gt["categories"]}
            labels = {int(v) for m in hard_negatives.images.values() for v in m.labels.tolist()}
            if labels - classes:
                raise HardNegativesFormatError(
                    f"{where} carry labels {sorted(labels - classes)} this dataset's categories "
                    f"lack ({sorted(classes)}); were they mined on another dataset?"
                )
            sizes = {im["id"]: (im.get("width"), im.get("height")) for im in coco_gt["images"]}
            for image_id, mined in sorted(hard_negatives.images.items()):
                width, height = sizes[image_id]
                if width is None or height is None or not mined.boxes.numel():
                    continue
                b, tol = mined.boxes, box_tolerance
                outside = (
                    (b[:, :2] < -tol).any(1) | (b[:, 2] > width + tol) | (b[:, 3] > height + tol)
                )
                if bool(outside.any()):
                    box = [round(v, 2) for v in b[int(outside.nonzero()[0])].tolist()]
                    raise HardNegativesFormatError(
                        f"{where}: image id {image_id}: box {box} reaches more than {tol:g} px "
                        f"outside the {width}x{height} image (data.box_tolerance); were they "
                        "mined on another dataset?"
                    )
        self.dataset = dataset
        self.hard_negatives = hard_negatives

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        image, target = self.dataset[index]
        target = dict(target)  # the wrapped dataset's dict stays as it was
        target[HARD_NEGATIVES_KEY] = self.hard_negatives.boxes_of(int(target["image_id"]))
        return image, target


def with_hard_negatives(
    dataset: Dataset, path: str | Path | None, *, box_tolerance: float = 1.0
) -> Dataset:
    """``dataset`` with the hard negatives of the file at ``path``; ``dataset`` itself for None.
    ``box_tolerance``: as ``HardNegativeDataset``.

    Raises:
        HardNegativesFormatError: the file is unreadable or malformed, or was mined on another
            dataset.
    """
    if path is None:
        return dataset
    return HardNegativeDataset(
        dataset, load_hard_negatives(path), path=path, box_tolerance=box_tolerance
    )
