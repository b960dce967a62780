"""Any COCO-format ("instances") detection dataset, read and written.

The whole annotation file is validated at construction, so that bad input fails before training
starts, with a message naming the file and the annotation (or image) id:

- a missing annotation file, malformed JSON, missing ``images`` / ``annotations`` /
  ``categories``, duplicate ids;
- an image entry whose ``width`` / ``height`` are not positive integers (both may be left out:
  they are then read from the file);
- an image file that does not exist, that cannot be decoded faithfully or is truncated (every
  file is decoded in full, in threads, before training starts: ``hardmine.data.images``; with
  ``check_images=False`` only when an item is read), or whose size, once its EXIF orientation is
  applied, differs from the one declared;
- an annotation whose image or category is unknown, or whose ``bbox`` is not four finite numbers;
- a *bad box*: zero or negative width or height, or one reaching more than ``box_tolerance`` pixels
  outside the image. Boxes within the tolerance are clipped to the image, since rounding in
  converters routinely puts edges a fraction of a pixel out. ``on_bad_box="error"`` (the default)
  raises; ``"skip"`` drops the annotation and warns once with the count and the first ids;
- with masks, an annotation with neither a usable ``segmentation`` nor a ``mask_file``, a mask
  file of another size than its image, or a ``mask_value`` that none of its pixels has.

Images are decoded by ``hardmine.data.images.read_image``: EXIF orientation applied, 16-bit
greyscale scaled by 65535, transparency composited over a stated background, or refused by name.

Category ids map to contiguous labels ``1..C`` in order of id; ``iscrowd`` annotations become
``ignore_boxes``. Masks come from polygons or RLE (decoded by ``faster_coco_eval``), or from the
PennFudan layout, where an annotation names a ``mask_file`` (relative to the annotation file's
folder) and the ``mask_value`` of its pixels there; for COCO's mask AP, ``coco_gt`` then carries
their RLE ``segmentation``, encoded when it is first read.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from faster_coco_eval.core import mask as mask_utils
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Subset

from hardmine.data.images import (
    CheckedFile,
    ImageFileError,
    check_files,
    describe_orientation,
    oriented_size,
    read_image,
    read_mask,
)
from hardmine.errors import DataError


class CocoFormatError(DataError):
    """A COCO annotation file, or a file it refers to, is unusable."""


@dataclass(frozen=True)
class _ImageRecord:
    """One image with its validated annotations (boxes already clipped, labels contiguous)."""

    image_id: int
    path: Path
    width: int
    height: int
    boxes: np.ndarray  # float32 [K, 4] xyxy
    labels: np.ndarray  # int64 [K]
    ignore_boxes: np.ndarray  # float32 [M, 4] xyxy
    annotations: list[dict[str, Any]]  # the K non-crowd annotations, for their masks


def _as_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_size(value: object) -> int | None:
    """A positive integer (``640`` or ``640.0``, as some converters write it), else None."""
    if _as_int(value) and value > 0:  # type: ignore[operator]
        return value  # type: ignore[return-value]
    if isinstance(value, float) and value.is_integer() and value > 0:
        return int(value)
    return None


class CocoDataset(Dataset[tuple[Tensor, dict[str, Tensor | int]]]):
    """A COCO-format detection dataset in the common interface (see ``hardmine.data``).

    Items are ``(image, target)``: ``image`` ``float32 [3, H, W]`` in [0, 1]; ``target`` with
    ``boxes`` ``float32 [K, 4]`` xyxy pixels, ``labels`` ``int64 [K]`` in ``1..C``, ``image_id``
    (the COCO image id), ``ignore_boxes`` ``float32 [M, 4]`` and, with masks, ``masks``
    ``uint8 [K, H, W]``. Images come in the order of the file's ``images`` list.

    Args:
        image_dir: folder that ``file_name`` is relative to.
        ann_file: the COCO instances JSON.
        with_masks: include instance masks in targets (every non-crowd annotation needs one).
        on_bad_box: ``"error"`` raises ``CocoFormatError`` on a bad box; ``"skip"`` drops it and
            warns.
        box_tolerance: how far, in pixels, a box may reach outside the image and still be
            clipped rather than be a bad box.
        check_images: decode every image (and, with masks, mask) file in full at construction,
            in threads, remembering unchanged files (``hardmine.data.images.check_files``);
            False reads only the sizes it needs from the files' headers and finds a bad file
            when its item is read.

    Raises:
        CocoFormatError: on any of the problems listed in the module docstring.
    """

    def __init__(
        self,
        image_dir: str | Path,
        ann_file: str | Path,
        *,
        with_masks: bool = False,
        on_bad_box: Literal["error", "skip"] = "error",
        box_tolerance: float = 1.0,
        check_images: bool = True,
    ) -> None:
        if on_bad_box not in ("error", "skip"):
            raise ValueError(f"on_bad_box must be 'error' or 'skip', got {on_bad_box!r}")
        if not (isinstance(box_tolerance, int | float) and 0 <= box_tolerance < math.inf):
            raise ValueError(f"box_tolerance must be a finite number >= 0, got {box_tolerance!r}")
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        self.with_masks = with_masks
        self._on_bad_box = on_bad_box
        self._tolerance = box_tolerance
        self._check_images = check_images
        data = self._load_json()

        cats = sorted(data["categories"], key=self._category_id)
        self._label_of = {c["id"]: i + 1 for i, c in enumerate(cats)}
        if len(self._label_of) != len(cats):
            raise self._error("duplicate category ids")
        self.categories: list[str] = [str(c.get("name", c["id"])) for c in cats]

        images = [self._check_image(img) for img in data["images"]]
        by_id = {img["id"]: img for img in images}
        if len(by_id) != len(images):
            raise self._error("duplicate image ids")
        images = self._image_sizes(images)
        by_id = {img["id"]: img for img in images}

        per_image: dict[int, list[dict[str, Any]]] = {i: [] for i in by_id}
        self._skipped: list[int] = []
        seen_ann: set[int] = set()
        for ann in data["annotations"]:
            checked = self._check_annotation(ann, by_id, seen_ann)
            if checked is not None:
                per_image[ann["image_id"]].append(checked)
        if self._skipped:
            shown = ", ".join(str(i) for i in self._skipped[:5])
            warnings.warn(
                f"{self.ann_file}: skipped {len(self._skipped)} annotation(s) with bad boxes "
                f"(ids {shown}{', ...' if len(self._skipped) > 5 else ''})",
                stacklevel=2,
            )

        if with_masks and check_images:
            self._check_mask_files(images, per_image)
        self._records = [self._record(img, per_image[img["id"]]) for img in images]
        self._coco_gt: dict = {
            "images": [
                {k: img[k] for k in ("id", "file_name", "width", "height")} for img in images
            ],
            "annotations": [a for img in images for a in per_image[img["id"]]],
            "categories": [
                {"id": self._label_of[c["id"]], "name": name}
                for c, name in zip(cats, self.categories, strict=True)
            ],
        }
        self._masks_encoded = not with_masks

    @property
    def coco_gt(self) -> dict[str, Any]:
        """The COCO instances dict of the dataset: labels as category ids, boxes clipped.

        With masks, annotations that name a ``mask_file`` carry its RLE ``segmentation`` too (for
        COCO's mask AP), encoded on first use.
        """
        if not self._masks_encoded:
            by_id = {r.image_id: r for r in self._records}
            for ann in self._coco_gt["annotations"]:
                if not ann.get("segmentation") and "mask_file" in ann:
                    mask = self._mask(ann, by_id[ann["image_id"]], {})
                    rle = mask_utils.encode(np.asfortranarray(mask[:, :, None]))[0]
                    ann["segmentation"] = {"size": rle["size"], "counts": _text(rle["counts"])}
            self._masks_encoded = True
        return self._coco_gt

    # --- validation -------------------------------------------------------------------------

    def _error(self, message: str, *, ann_id: object = None, image_id: object = None) -> Exception:
        where = f"annotation id {ann_id}: " if ann_id is not None else ""
        where = f"image id {image_id}: " if image_id is not None else where
        return CocoFormatError(f"{self.ann_file}: {where}{message}")

    def _load_json(self) -> dict[str, Any]:
        try:
            with open(self.ann_file, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise self._error("annotation file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise self._error(f"malformed JSON: {e}") from None
        if not isinstance(data, dict):
            raise self._error("expected a JSON object at the top level")
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                raise self._error(f"missing or non-list {key!r}")
        return data

    def _category_id(self, cat: object) -> int:
        if not isinstance(cat, dict) or not _as_int(cat.get("id")):
            raise self._error(f"category without an integer id: {cat!r}")
        return cat["id"]

    def _check_image(self, img: object) -> dict[str, Any]:
        """The image entry, its declared ``width`` / ``height`` checked (None when left out)."""
        if not isinstance(img, dict) or not _as_int(img.get("id")):
            raise self._error(f"image entry without an integer id: {img!r}")
        image_id = img["id"]
        if not isinstance(img.get("file_name"), str):
            raise self._error("missing 'file_name'", image_id=image_id)
        path = self.image_dir / img["file_name"]
        if not path.is_file():
            raise self._error(f"image file not found: {path}", image_id=image_id)
        width, height = img.get("width"), img.get("height")
        if width is None and height is None:
            return {**img, "width": None, "height": None}
        size = _positive_size(width), _positive_size(height)
        if None in size:
            raise self._error(
                f"bad image size {width!r}x{height!r} for {img['file_name']}: width and height "
                "must be positive integers (or both left out, to be read from the file)",
                image_id=image_id,
            )
        return {**img, "width": size[0], "height": size[1]}

    def _image_sizes(self, images: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The entries with every image's size: checked against the decoded (oriented) file, or
        read from its header where the entry has none and ``check_images`` is off."""
        paths = [self.image_dir / img["file_name"] for img in images]
        if not self._check_images:
            return [
                img if img["width"] is not None else self._header_size(img, path)
                for img, path in zip(images, paths, strict=True)
            ]
        found = check_files(paths, "image", cache_name=str(self.ann_file.resolve()))
        self._raise_first_failure(images, found, "image")
        out = []
        for img, path, checked in zip(images, paths, found, strict=True):
            assert isinstance(checked, CheckedFile)
            size = (checked.width, checked.height)
            if img["width"] is None:
                img = {**img, "width": size[0], "height": size[1]}
            elif (img["width"], img["height"]) != size:
                raise self._size_error(path, size, img)
            out.append(img)
        return out

    def _header_size(self, img: dict[str, Any], path: Path) -> dict[str, Any]:
        try:
            width, height = oriented_size(path)
        except ImageFileError as error:
            raise self._error(str(error), image_id=img["id"]) from None
        return {**img, "width": width, "height": height}

    def _raise_first_failure(
        self,
        images: list[dict[str, Any]],
        found: list[CheckedFile | ImageFileError],
        kind: str,
    ) -> None:
        failed = [
            (img["id"], r)
            for img, r in zip(images, found, strict=True)
            if not isinstance(r, CheckedFile)
        ]
        if not failed:
            return
        (image_id, error), rest = failed[0], failed[1:]
        more = ""
        if rest:
            ids = ", ".join(str(i) for i, _ in rest[:5]) + (", ..." if len(rest) > 5 else "")
            more = f" (and {len(rest)} more bad {kind} file(s): image ids {ids})"
        raise self._error(f"{error}{more}", image_id=image_id)

    def _size_error(
        self, path: Path, size: tuple[int, int], img: dict[str, Any]
    ) -> CocoFormatError:
        turned = describe_orientation(path)
        fix = (
            "boxes are read on the image as oriented, as detectron2 and mmcv read it"
            if turned
            else "correct the entry's width and height"
        )
        return self._error(
            f"{path} is {size[0]}x{size[1]}{turned}, the annotation file declares "
            f"{img['width']}x{img['height']}; {fix}",
            image_id=img["id"],
        )

    def _check_annotation(
        self, ann: object, images: dict[int, dict[str, Any]], seen: set[int]
    ) -> dict[str, Any] | None:
        """The annotation for ``coco_gt`` (label as category, box clipped), or None if skipped."""
        if not isinstance(ann, dict) or not _as_int(ann.get("id")):
            raise self._error(f"annotation without an integer id: {ann!r}")
        ann_id = ann["id"]
        if ann_id in seen:
            raise self._error("duplicate annotation id", ann_id=ann_id)
        seen.add(ann_id)
        img = images.get(ann.get("image_id"))  # type: ignore[arg-type]
        if img is None:
            raise self._error(f"unknown image_id {ann.get('image_id')!r}", ann_id=ann_id)
        label = self._label_of.get(ann.get("category_id"))  # type: ignore[arg-type]
        if label is None:
            raise self._error(f"unknown category_id {ann.get('category_id')!r}", ann_id=ann_id)
        bbox = ann.get("bbox")
        if (
            not isinstance(bbox, list)
            or len(bbox) != 4
            or not all(isinstance(v, int | float) and math.isfinite(v) for v in bbox)
        ):
            raise self._error(
                f"bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}", ann_id=ann_id
            )
        crowd = bool(ann.get("iscrowd", 0))

        box = self._clip_box(bbox, img, ann_id)
        if box is None:
            return None
        if self.with_masks:
            self._check_mask_source(ann, img)
        x1, y1, x2, y2 = box
        out = {
            "id": ann_id,
            "image_id": img["id"],
            "category_id": label,
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "area": float(ann.get("area", (x2 - x1) * (y2 - y1))),
            "iscrowd": int(crowd),
        }
        for key in ("segmentation", "mask_file", "mask_value"):
            if key in ann:
                out[key] = ann[key]
        return out

    def _clip_box(
        self, bbox: list[float], img: dict[str, Any], ann_id: int
    ) -> tuple[float, float, float, float] | None:
        """``[x, y, w, h]`` -> clipped xyxy, or None for a bad box that is skipped."""
        x, y, w, h = bbox
        width, height, tol = img["width"], img["height"], self._tolerance
        problem = None
        if w <= 0 or h <= 0:
            problem = f"zero-area box {bbox}"
        elif x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
            problem = f"box {bbox} reaches more than {tol} px outside the {width}x{height} image"
        else:
            x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
            x2, y2 = min(x + w, width), min(y + h, height)
            if x2 > x1 and y2 > y1:
                return float(x1), float(y1), float(x2), float(y2)
            problem = f"box {bbox} has zero area once clipped to the {width}x{height} image"
        if self._on_bad_box == "error":
            raise self._error(
                f"{problem} in {img['file_name']}; on_bad_box='skip' "
                "(--data.on_bad_box skip) drops such boxes",
                ann_id=ann_id,
            )
        self._skipped.append(ann_id)
        return None

    def _check_mask_source(self, ann: dict[str, Any], img: dict[str, Any]) -> None:
        segm = ann.get("segmentation")
        if segm:
            if isinstance(segm, list):
                ok = all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in segm)
            else:
                ok = (
                    isinstance(segm, dict)
                    and "counts" in segm
                    and list(segm.get("size", [])) == [img["height"], img["width"]]
                )
            if not ok:
                raise self._error(
                    "segmentation is neither polygons nor an RLE of the image's size",
                    ann_id=ann["id"],
                )
        elif "mask_file" in ann and "mask_value" in ann:
            if not isinstance(ann["mask_file"], str) or not _as_int(ann["mask_value"]):
                raise self._error(
                    "mask_file must be a path and mask_value an integer, got "
                    f"{ann['mask_file']!r} and {ann['mask_value']!r}",
                    ann_id=ann["id"],
                )
            path = self.ann_file.parent / ann["mask_file"]
            if not path.is_file():
                raise self._error(f"mask file not found: {path}", ann_id=ann["id"])
        else:
            raise self._error(
                "with_masks needs a 'segmentation' or a 'mask_file' and 'mask_value'",
                ann_id=ann["id"],
            )

    def _check_mask_files(
        self, images: list[dict[str, Any]], per_image: dict[int, list[dict[str, Any]]]
    ) -> None:
        """Decode every mask file; each must have its image's size and every mask_value named."""
        named = [(img, ann) for img in images for ann in per_image[img["id"]] if "mask_file" in ann]
        paths = sorted({self.ann_file.parent / ann["mask_file"] for _, ann in named})
        found = dict(
            zip(
                paths,
                check_files(paths, "mask", cache_name=str(self.ann_file.resolve())),
                strict=True,
            )
        )
        for img, ann in named:
            path = self.ann_file.parent / ann["mask_file"]
            checked = found[path]
            if not isinstance(checked, CheckedFile):
                raise self._error(str(checked), ann_id=ann["id"])
            if (checked.width, checked.height) != (img["width"], img["height"]):
                raise self._error(
                    f"mask file {path} is {checked.width}x{checked.height}, its image "
                    f"{img['file_name']} {img['width']}x{img['height']}",
                    ann_id=ann["id"],
                )
            if ann["mask_value"] not in (checked.values or ()):
                raise self._error(
                    f"no pixel of mask file {path} has the mask_value {ann['mask_value']}",
                    ann_id=ann["id"],
                )

    def _record(self, img: dict[str, Any], anns: list[dict[str, Any]]) -> _ImageRecord:
        def xyxy(group: list[dict[str, Any]]) -> np.ndarray:
            boxes = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in group)]
            return np.array(boxes, dtype=np.float32).reshape(-1, 4)

        objects = [a for a in anns if not a["iscrowd"]]
        return _ImageRecord(
            image_id=img["id"],
            path=self.image_dir / img["file_name"],
            width=img["width"],
            height=img["height"],
            boxes=xyxy(objects),
            labels=np.array([a["category_id"] for a in objects], dtype=np.int64),
            ignore_boxes=xyxy([a for a in anns if a["iscrowd"]]),
            annotations=objects,
        )

    # --- items ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor | int]]:
        rec = self._records[index]
        try:
            image = read_image(rec.path)
        except ImageFileError as error:
            raise self._error(str(error), image_id=rec.image_id) from None
        if (image.shape[2], image.shape[1]) != (rec.width, rec.height):
            size = (image.shape[2], image.shape[1])
            raise self._size_error(
                rec.path, size, {"id": rec.image_id, "width": rec.width, "height": rec.height}
            )
        target: dict[str, Tensor | int] = {
            "boxes": torch.from_numpy(rec.boxes.copy()),
            "labels": torch.from_numpy(rec.labels.copy()),
            "image_id": rec.image_id,
            "ignore_boxes": torch.from_numpy(rec.ignore_boxes.copy()),
        }
        if self.with_masks:
            files: dict[str, np.ndarray] = {}  # each mask file read once per item
            masks = [self._mask(a, rec, files) for a in rec.annotations]
            target["masks"] = torch.from_numpy(
                np.stack(masks) if masks else np.zeros((0, rec.height, rec.width), np.uint8)
            )
        return image, target

    def _mask(
        self, ann: dict[str, Any], rec: _ImageRecord, files: dict[str, np.ndarray]
    ) -> np.ndarray:
        """``uint8 [H, W]`` mask of a validated annotation (``files``: mask files read so far)."""
        segm = ann.get("segmentation")
        if not segm:
            name = ann["mask_file"]
            if name not in files:
                try:
                    files[name] = read_mask(self.ann_file.parent / name)
                except ImageFileError as error:
                    raise self._error(str(error), ann_id=ann["id"]) from None
            values = files[name]
            if values.shape != (rec.height, rec.width):
                raise self._error(
                    f"mask file {name} is {values.shape[1]}x{values.shape[0]}, its image "
                    f"{rec.width}x{rec.height}",
                    ann_id=ann["id"],
                )
            return (values == ann["mask_value"]).astype(np.uint8)
        if isinstance(segm, list):  # polygons, one object possibly in several parts
            rle = mask_utils.merge(mask_utils.frPyObjects(segm, rec.height, rec.width))
        elif isinstance(segm["counts"], list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(segm, rec.height, rec.width)
        else:
            rle = segm
        return mask_utils.decode(rle).astype(np.uint8)


def _text(counts: bytes | str) -> str:
    """An RLE's compressed counts as JSON text (``faster_coco_eval`` encodes them as bytes)."""
    return counts.decode("ascii") if isinstance(counts, bytes) else counts


def write_coco(dataset: Dataset, out_dir: str | Path) -> Path:
    """Write a dataset of the common interface as PNG images and a COCO instances JSON.

    Images go to ``out_dir/images/`` (named after ``coco_gt``'s ``file_name``, with a ``.png``
    suffix), the annotations (``dataset.coco_gt``) to ``out_dir/annotations.json``; read them back
    with ``CocoDataset(out_dir / "images", out_dir / "annotations.json")``.

    Args:
        dataset: items ``(image float32 [3, H, W] in [0, 1], target)`` and a ``coco_gt`` dict.
        out_dir: created if needed.

    Returns:
        The path of the JSON file.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    coco_gt: dict = dataset.coco_gt  # type: ignore[attr-defined]
    entries = {img["id"]: {**img} for img in coco_gt["images"]}
    for index in range(len(dataset)):  # type: ignore[arg-type]
        image, target = dataset[index]
        entry = entries[target["image_id"]]
        entry["file_name"] = str(Path(entry["file_name"]).with_suffix(".png"))
        pixels = (image * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        path = out_dir / "images" / entry["file_name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
    ann_file = out_dir / "annotations.json"
    ann_file.write_text(json.dumps({**coco_gt, "images": list(entries.values())}))
    return ann_file


def coco_gt_of(dataset: Dataset) -> dict[str, Any] | None:
    """The ``coco_gt`` of a dataset, looking through ``Subset`` wrappers; None without one."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return getattr(dataset, "coco_gt", None)


#: The shared PennFudan layout's validation images, as torchvision's detection tutorial splits it.
PENNFUDAN_VAL_IMAGES = 50


def pennfudan_split(
    root: str | Path,
    *,
    with_masks: bool,
    on_bad_box: Literal["error", "skip"] = "error",
    box_tolerance: float = 1.0,
    check_images: bool = True,
) -> tuple[Dataset, Dataset, list[str]]:
    """The PennFudan layout (``PNGImages/``, ``annotations.json``) split as torchvision's
    detection tutorial does: images sorted by file name, the last 50 are validation.

    Args:
        root: the folder.
        with_masks: as ``CocoDataset``, and so are the others.

    Returns:
        The training set, the validation set and the category names.

    Raises:
        CocoFormatError: the annotation file is missing or malformed, or the folder holds no more
            than 50 images.
    """
    root = Path(root)
    dataset = CocoDataset(
        root / "PNGImages",
        root / "annotations.json",
        with_masks=with_masks,
        on_bad_box=on_bad_box,
        box_tolerance=box_tolerance,
        check_images=check_images,
    )
    names = [image["file_name"] for image in dataset._coco_gt["images"]]  # in item order
    order = sorted(range(len(names)), key=names.__getitem__)
    cut = len(order) - PENNFUDAN_VAL_IMAGES
    if cut <= 0:
        raise CocoFormatError(
            f"{dataset.ann_file}: {len(order)} images, the PennFudan split needs more than "
            f"{PENNFUDAN_VAL_IMAGES} (the last {PENNFUDAN_VAL_IMAGES} by file name validate)"
        )
    return Subset(dataset, order[:cut]), Subset(dataset, order[cut:]), dataset.categories
