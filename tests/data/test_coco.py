import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from faster_coco_eval.core import mask as mask_utils
from PIL import Image

from hardmine.data import CocoDataset, CocoFormatError, SceneDataset, pennfudan_split, write_coco
from hardmine.engine.evaluate import coco_ap


def _write(root: Path, data: dict[str, Any] | str) -> Path:
    ann_file = root / "ann.json"
    ann_file.write_text(data if isinstance(data, str) else json.dumps(data))
    return ann_file


@pytest.fixture
def tiny(tmp_path: Path) -> dict[str, Any]:
    """Two 20 × 16 images, categories with unsorted, non-contiguous ids, one crowd region."""
    (tmp_path / "img").mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (20, 16), (10, 20, 30)).save(tmp_path / "img" / name)
    mask = np.zeros((16, 20), np.uint8)
    mask[2:6, 3:9] = 7
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return {
        "images": [
            {"id": 10, "file_name": "a.png", "width": 20, "height": 16},
            {"id": 11, "file_name": "b.png", "width": 20, "height": 16},
        ],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 7, "bbox": [3, 2, 6, 4], "iscrowd": 0,
             "segmentation": [[3, 2, 9, 2, 9, 6, 3, 6]], "area": 24},
            {"id": 2, "image_id": 10, "category_id": 2, "bbox": [0, 0, 5, 5], "iscrowd": 1,
             "segmentation": [[0, 0, 5, 0, 5, 5, 0, 5]]},
            {"id": 3, "image_id": 11, "category_id": 2, "bbox": [10, 8, 10.5, 8], "iscrowd": 0,
             "mask_file": "mask.png", "mask_value": 7},
        ],
        "categories": [{"id": 7, "name": "cat"}, {"id": 2, "name": "dog"}],
    }  # fmt: skip


def test_labels_follow_sorted_category_ids_and_crowds_are_ignored(
    tmp_path: Path, tiny: dict[str, Any]
) -> None:
    ds = CocoDataset(tmp_path / "img", _write(tmp_path, tiny))
    assert ds.categories == ["dog", "cat"]
    assert len(ds) == 2
    image, target = ds[0]
    assert image.shape == (3, 16, 20) and image.dtype == torch.float32
    assert target["image_id"] == 10
    assert target["boxes"].tolist() == [[3, 2, 9, 6]]
    assert target["labels"].tolist() == [2]
    assert target["ignore_boxes"].tolist() == [[0, 0, 5, 5]]
    # Slightly out (by half a pixel): clipped to the image.
    assert ds[1][1]["boxes"].tolist() == [[10, 8, 20, 16]]
    assert ds[1][1]["ignore_boxes"].shape == (0, 4)
    assert [a["category_id"] for a in ds.coco_gt["annotations"]] == [2, 1, 1]
    assert ds.coco_gt["categories"] == [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}]


def test_masks_from_polygons_and_mask_files(tmp_path: Path, tiny: dict[str, Any]) -> None:
    ds = CocoDataset(tmp_path / "img", _write(tmp_path, tiny), with_masks=True)
    expected = torch.zeros(16, 20, dtype=torch.uint8)
    expected[2:6, 3:9] = 1
    for index in (0, 1):
        masks = ds[index][1]["masks"]
        assert masks.dtype == torch.uint8 and masks.shape == (1, 16, 20)
    # The polygon is rasterised by COCO's rules, so compare areas rather than pixels.
    assert int(ds[0][1]["masks"].sum()) == pytest.approx(24, abs=6)
    assert torch.equal(ds[1][1]["masks"][0], expected)


def test_round_trip_of_scenes(tmp_path: Path) -> None:
    scenes = SceneDataset(3, seed=7, image_size=64, with_masks=True)
    ann_file = write_coco(scenes, tmp_path / "out")
    loaded = CocoDataset(tmp_path / "out" / "images", ann_file, with_masks=True)
    assert loaded.categories == scenes.categories
    assert len(loaded) == len(scenes)
    for (a, ta), (b, tb) in zip(scenes, loaded, strict=True):
        assert torch.equal(a, b)
        for key in ("boxes", "labels", "ignore_boxes", "masks"):
            assert torch.equal(ta[key], tb[key]), key
        assert ta["image_id"] == tb["image_id"]


def _break(tiny: dict[str, Any], case: str) -> tuple[dict[str, Any], str]:
    """Damage ``tiny`` in one way; returns it and the id the error must name."""
    ann = tiny["annotations"][0]
    if case == "missing image file":
        tiny["images"][1]["file_name"] = "gone.png"
        return tiny, "image id 11"
    if case == "unknown category":
        ann["category_id"] = 99
    elif case == "unknown image":
        ann["image_id"] = 99
    elif case == "box outside":
        ann["bbox"] = [25, 2, 4, 4]
    elif case == "box beyond tolerance":
        ann["bbox"] = [3, 2, 20, 4]
    elif case == "zero-area box":
        ann["bbox"] = [3, 2, 0, 4]
    elif case == "malformed bbox":
        ann["bbox"] = [3, 2, 4]
    elif case == "duplicate id":
        tiny["annotations"][1]["id"] = 1
    return tiny, "annotation id 1"


@pytest.mark.parametrize(
    "case",
    [
        "missing image file",
        "unknown category",
        "unknown image",
        "box outside",
        "box beyond tolerance",
        "zero-area box",
        "malformed bbox",
        "duplicate id",
    ],
)
def test_bad_input_names_the_file_and_the_id(
    tmp_path: Path, tiny: dict[str, Any], case: str
) -> None:
    data, names = _break(tiny, case)
    ann_file = _write(tmp_path, data)
    with pytest.raises(CocoFormatError) as info:
        CocoDataset(tmp_path / "img", ann_file)
    assert str(ann_file) in str(info.value)
    assert f"{names}:" in str(info.value)


def test_malformed_json_names_the_file(tmp_path: Path) -> None:
    ann_file = _write(tmp_path, '{"images": [')
    with pytest.raises(CocoFormatError, match="malformed JSON") as info:
        CocoDataset(tmp_path, ann_file)
    assert str(ann_file) in str(info.value)


def test_masks_required_when_asked_for(tmp_path: Path, tiny: dict[str, Any]) -> None:
    del tiny["annotations"][2]["mask_file"]
    with pytest.raises(CocoFormatError, match="annotation id 3: with_masks"):
        CocoDataset(tmp_path / "img", _write(tmp_path, tiny), with_masks=True)
    CocoDataset(tmp_path / "img", _write(tmp_path, tiny))  # boxes alone need no masks


def test_skip_drops_bad_boxes_with_a_warning(tmp_path: Path, tiny: dict[str, Any]) -> None:
    tiny["annotations"][0]["bbox"] = [3, 2, 0, 4]
    with pytest.warns(UserWarning, match=r"skipped 1 annotation.*ids 1\)"):
        ds = CocoDataset(tmp_path / "img", _write(tmp_path, tiny), on_bad_box="skip")
    assert ds[0][1]["boxes"].shape == (0, 4)
    assert [a["id"] for a in ds.coco_gt["annotations"]] == [2, 3]


def test_image_size_differing_from_the_declared_one(tmp_path: Path, tiny: dict[str, Any]) -> None:
    # Refused before any work (it was found only when the item was read).
    tiny["images"][0]["width"] = 30
    ann_file = _write(tmp_path, tiny)
    expected = (
        r"image id 10: .*a\.png is 20x16, the annotation file "
        r"declares 30x16; correct the entry's width and height"
    )
    with pytest.raises(CocoFormatError, match=expected):
        CocoDataset(tmp_path / "img", ann_file)
    ds = CocoDataset(tmp_path / "img", ann_file, check_images=False)
    with pytest.raises(CocoFormatError, match=r"image id 10: .*a\.png is 20x16"):
        ds[0]


def test_missing_size_is_read_from_the_file(tmp_path: Path, tiny: dict[str, Any]) -> None:
    del tiny["images"][1]["width"], tiny["images"][1]["height"]
    ds = CocoDataset(tmp_path / "img", _write(tmp_path, tiny))
    assert ds.coco_gt["images"][1]["width"] == 20
    assert ds[1][0].shape == (3, 16, 20)


def _exif_turned(path: Path, pixels: np.ndarray) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # viewers turn it 90 degrees clockwise
    Image.fromarray(pixels).save(path, exif=exif)


def test_exif_orientation_and_the_declared_size(tmp_path: Path, tiny: dict[str, Any]) -> None:
    """The declared size is the oriented one; boxes are read on the oriented image."""
    stored = np.zeros((20, 16, 3), np.uint8)  # 16 wide, 20 high as stored; 20 x 16 as viewed
    stored[:4] = 255
    _exif_turned(tmp_path / "img" / "a.png", stored)
    ds = CocoDataset(tmp_path / "img", _write(tmp_path, tiny))
    image, target = ds[0]
    assert image.shape == (3, 16, 20)
    assert image[:, :, -4:].eq(1).all() and image[:, :, :-4].eq(0).all()  # the top went right
    assert target["boxes"].tolist() == [[3, 2, 9, 6]]
    tiny["images"][0].update(width=16, height=20)  # the stored size: refused, saying why
    expected = (
        r"image id 10: .*a\.png is 20x16 \(after its EXIF "
        r"orientation 6, which turns it by 90 degrees\), the annotation file "
        r"declares 16x20; boxes are read on the image as oriented"
    )
    with pytest.raises(CocoFormatError, match=expected):
        CocoDataset(tmp_path / "img", _write(tmp_path, tiny))
    del tiny["images"][0]["width"], tiny["images"][0]["height"]
    for check in (True, False):
        ds = CocoDataset(tmp_path / "img", _write(tmp_path, tiny), check_images=check)
        assert ds.coco_gt["images"][0]["width"] == 20 and ds[0][0].shape == (3, 16, 20)


def test_16_bit_images_keep_their_grey_levels(tmp_path: Path, tiny: dict[str, Any]) -> None:
    values = (np.arange(16 * 20).reshape(16, 20) * 200).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "img" / "a.png")
    image = CocoDataset(tmp_path / "img", _write(tmp_path, tiny))[0][0]
    torch.testing.assert_close(image[1], torch.from_numpy(values / 65535).float())


@pytest.mark.parametrize(
    ("width", "height"), [(-5, 96), (0, 16), (20, None), ("20", 16), (True, 16), (20.5, 16)]
)
def test_bad_image_sizes_are_named_as_such(tmp_path, tiny, width, height) -> None:
    # Not as a box "outside the -5x96 image".
    tiny["images"][0].update(width=width, height=height)
    expected = (
        r"image id 10: bad image size .* for a\.png: width "
        r"and height must be positive integers"
    )
    with pytest.raises(CocoFormatError, match=expected):
        CocoDataset(tmp_path / "img", _write(tmp_path, tiny))


def test_integral_float_sizes_are_accepted(tmp_path: Path, tiny: dict[str, Any]) -> None:
    tiny["images"][0].update(width=20.0, height=16.0)
    ds = CocoDataset(tmp_path / "img", _write(tmp_path, tiny))
    assert ds.coco_gt["images"][0]["width"] == 20 and isinstance(ds._records[0].width, int)


def test_truncated_images_are_found_before_work_starts(tmp_path, tiny) -> None:
    for name in ("a.png", "b.png"):
        path = tmp_path / "img" / name
        Image.fromarray(np.full((16, 20, 3), 7, np.uint8)).save(path.with_suffix(".jpg"))
        data = path.with_suffix(".jpg").read_bytes()
        path.with_suffix(".jpg").write_bytes(data[:-5])
    for img in tiny["images"]:
        img["file_name"] = img["file_name"].replace(".png", ".jpg")
    ann_file = _write(tmp_path, tiny)
    with pytest.raises(CocoFormatError) as info:
        CocoDataset(tmp_path / "img", ann_file)
    message = str(info.value)
    assert message.startswith(f"{ann_file}: image id 10: {tmp_path / 'img' / 'a.jpg'}: ")
    assert "image file is truncated" in message
    assert message.endswith("(and 1 more bad image file(s): image ids 11)")
    assert "\n" not in message
    # Unchecked, the item names the file and the id when it is read.
    ds = CocoDataset(tmp_path / "img", ann_file, check_images=False)
    with pytest.raises(CocoFormatError, match=r"image id 11: .*b\.jpg: .*truncated"):
        ds[1]


def test_unsupported_pixels_are_refused_by_file_and_id(tmp_path, tiny) -> None:
    Image.new("I", (20, 16), 300).save(tmp_path / "img" / "b.tif")
    tiny["images"][1]["file_name"] = "b.tif"
    with pytest.raises(CocoFormatError, match=r"image id 11: .*b\.tif: 32-bit integer pixels"):
        CocoDataset(tmp_path / "img", _write(tmp_path, tiny))


def test_mask_files_are_checked_against_their_image(tmp_path, tiny) -> None:
    tiny["annotations"][2]["mask_value"] = 8
    expected = (
        r"annotation id 3: no pixel of mask file .*mask\.png "
        r"has the mask_value 8"
    )
    with pytest.raises(CocoFormatError, match=expected):
        CocoDataset(tmp_path / "img", _write(tmp_path, tiny), with_masks=True)
    tiny["annotations"][2]["mask_value"] = 7
    Image.fromarray(np.full((16, 21), 7, np.uint8)).save(tmp_path / "mask.png")
    with pytest.raises(CocoFormatError, match=r"annotation id 3: mask file .* is 21x16, its image"):
        CocoDataset(tmp_path / "img", _write(tmp_path, tiny), with_masks=True)
    Image.new("RGB", (20, 16)).save(tmp_path / "mask.png")
    with pytest.raises(CocoFormatError, match=r"annotation id 3: .*mask must have one integer"):
        CocoDataset(tmp_path / "img", _write(tmp_path, tiny), with_masks=True)


def test_mask_files_give_coco_gt_rles_for_mask_ap(tmp_path, tiny) -> None:
    """Mask AP of the PennFudan layout: ``KeyError: 'rle'`` before."""
    ds = CocoDataset(tmp_path / "img", _write(tmp_path, tiny), with_masks=True)
    ann = ds.coco_gt["annotations"][2]
    assert ann["id"] == 3 and isinstance(ann["segmentation"]["counts"], str)
    json.dumps(ds.coco_gt)  # stays JSON
    mask = mask_utils.decode(ann["segmentation"])
    assert np.array_equal(mask, ds[1][1]["masks"][0].numpy())
    detections = [
        {"image_id": 11, "category_id": 1, "bbox": [3, 2, 6, 4], "score": 0.9,
         "segmentation": mask_utils.encode(np.asfortranarray(mask[:, :, None]))[0]},
    ]  # fmt: skip
    ap = coco_ap(ds.coco_gt, detections, iou_type="segm", image_ids=[11])
    assert ap["mask_AP"] == pytest.approx(1.0)


def test_box_tolerance_must_be_a_distance(tmp_path, tiny) -> None:
    with pytest.raises(ValueError, match=r"box_tolerance must be a finite number >= 0, got -1"):
        CocoDataset(tmp_path / "img", _write(tmp_path, tiny), box_tolerance=-1)


def test_missing_annotation_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(CocoFormatError, match=r"gone\.json: annotation file not found$"):
        CocoDataset(tmp_path, tmp_path / "gone.json")
    with pytest.raises(CocoFormatError, match=r"nowhere/annotations\.json: annotation file not"):
        pennfudan_split(tmp_path / "nowhere", with_masks=False)


def test_a_pennfudan_folder_of_too_few_images(tmp_path: Path, tiny: dict[str, Any]) -> None:
    (tmp_path / "img").rename(tmp_path / "PNGImages")
    (tmp_path / "annotations.json").write_text(json.dumps(tiny))
    with pytest.raises(CocoFormatError, match=r"annotations\.json: 2 images, the PennFudan split"):
        pennfudan_split(tmp_path, with_masks=False)
