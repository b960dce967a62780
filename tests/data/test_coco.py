import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from hardmine.data import CocoDataset, CocoFormatError, SceneDataset, write_coco


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
    tiny["images"][0]["width"] = 30
    ds = CocoDataset(tmp_path / "img", _write(tmp_path, tiny))
    with pytest.raises(CocoFormatError, match=r"image id 10: .*a\.png is 20x16"):
        ds[0]


def test_missing_size_is_read_from_the_file(tmp_path: Path, tiny: dict[str, Any]) -> None:
    del tiny["images"][1]["width"], tiny["images"][1]["height"]
    ds = CocoDataset(tmp_path / "img", _write(tmp_path, tiny))
    assert ds.coco_gt["images"][1]["width"] == 20
    assert ds[1][0].shape == (3, 16, 20)
