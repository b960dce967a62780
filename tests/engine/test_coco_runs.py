"""Runs on COCO-format folders made here: the PennFudan layout with Mask R-CNN (masks from mask
files), and the data settings of the configuration (``on_bad_box``, ``box_tolerance``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hardmine.config import ConfigError
from hardmine.data import CocoFormatError
from hardmine.engine.build import build_datasets, load_run_config
from hardmine.engine.evaluate import evaluate_run
from hardmine.engine.train import train


def pennfudan_like(root: Path, num_images: int = 52) -> Path:
    """``PNGImages/``, ``PedMasks/`` and ``annotations.json`` as the shared PennFudan folder has
    them: 40 x 48 images, two people each, masks by instance value in a palette PNG."""
    (root / "PNGImages").mkdir(parents=True)
    (root / "PedMasks").mkdir()
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(1, num_images + 1):
        name = f"FudanPed{i:05d}"
        pixels = rng.integers(0, 60, (48, 40, 3), dtype=np.uint8)
        mask = np.zeros((48, 40), np.uint8)
        for value, (x, y, w, h) in enumerate([(4, 6, 12, 30), (22, 10, 14, 34)], start=1):
            mask[y : y + h, x : x + w] = value
            pixels[y : y + h, x : x + w] = 200
            annotations.append(
                {"id": len(annotations) + 1, "image_id": i, "category_id": 1,
                 "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
                 "mask_file": f"PedMasks/{name}_mask.png", "mask_value": value}
            )  # fmt: skip
        Image.fromarray(pixels).save(root / "PNGImages" / f"{name}.png")
        palette = Image.fromarray(mask, mode="L").convert("P")
        palette.save(root / "PedMasks" / f"{name}_mask.png")
        images.append({"id": i, "file_name": f"{name}.png", "width": 40, "height": 48})
    data = {"images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "person"}]}  # fmt: skip
    (root / "annotations.json").write_text(json.dumps(data))
    return root


def test_mask_rcnn_trains_and_evaluates_on_the_pennfudan_layout(tmp_path: Path) -> None:
    """Mask AP with masks from mask files: ``KeyError: 'rle'`` in the evaluation before."""
    root = pennfudan_like(tmp_path / "pennfudan")
    config = load_run_config(
        None,
        {
            "model.name": "mask_rcnn_tiny", "model.min_size": 48, "model.max_size": 64,
            "model.box_detections_per_img": 10, "model.rpn_post_nms_top_n_test": 50,
            "sampler.num": 32, "data.kind": "coco", "data.root": str(root),
            "data.batch_size": 2, "train.epochs": 1, "train.max_steps": 1,
            "train.warmup_steps": 1, "device": "cpu", "output_dir": str(tmp_path / "run"),
        },
    )  # fmt: skip
    result = train(config)
    assert {"AP", "mask_AP", "mask_APl"} <= set(result.metrics)
    assert result.metrics["mask_APl"] is None  # no large objects: not measurable, not -1
    assert all(v is None or 0 <= v <= 1 for v in result.metrics.values())
    again = evaluate_run(tmp_path / "run", device="cpu")  # hardmine eval
    assert set(again) == set(result.metrics)
    written = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert written["metrics"]["mask_APl"] is None


def _coco_folder(root: Path, bbox: list[float]) -> dict[str, str]:
    """One 32 x 24 image with one box, as training and validation set; the data overrides."""
    (root / "img").mkdir(parents=True)
    Image.new("RGB", (32, 24), (90, 90, 90)).save(root / "img" / "a.png")
    data = {
        "images": [{"id": 5, "file_name": "a.png", "width": 32, "height": 24}],
        "annotations": [
            {"id": 9, "image_id": 5, "category_id": 1, "bbox": bbox, "iscrowd": 0},
            {"id": 10, "image_id": 5, "category_id": 1, "bbox": [2, 2, 8, 8], "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (root / "ann.json").write_text(json.dumps(data))
    images, ann = str(root / "img"), str(root / "ann.json")
    return {"data.kind": "coco", "data.train_images": images, "data.train_ann": ann,
            "data.val_images": images, "data.val_ann": ann}  # fmt: skip


def test_on_bad_box_skip_is_a_data_setting(tmp_path: Path) -> None:
    data = _coco_folder(tmp_path, [10, 4, 0, 6])  # zero width
    with pytest.raises(CocoFormatError, match=r"annotation id 9: zero-area box .* in a\.png; "
                       r"on_bad_box='skip' \(--data\.on_bad_box skip\)"):  # fmt: skip
        build_datasets(load_run_config(None, data))
    with pytest.warns(UserWarning, match=r"skipped 1 annotation.*ids 9\)"):
        train_set, _, _ = build_datasets(load_run_config(None, {**data, "data.on_bad_box": "skip"}))
    assert train_set[0][1]["boxes"].tolist() == [[2, 2, 10, 10]]


def test_box_tolerance_is_a_data_setting(tmp_path: Path) -> None:
    data = _coco_folder(tmp_path, [20, 4, 14, 6])  # 2 px beyond the right edge
    with pytest.raises(CocoFormatError, match=r"annotation id 9: box .* reaches more than 1\.0 px"):
        build_datasets(load_run_config(None, data))
    train_set, _, _ = build_datasets(load_run_config(None, {**data, "data.box_tolerance": 3}))
    assert train_set[0][1]["boxes"].tolist()[0] == [20, 4, 32, 10]  # clipped


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"data.on_bad_box": "clip"}, r"data\.on_bad_box: expected one of \('error', 'skip'\)"),
        ({"data.box_tolerance": -1}, r"data\.box_tolerance: expected a finite number of pixels"),
        ({"data.check_images": "yes"}, r"data\.check_images: expected bool"),
        ({"data.kind": "coco"}, r"data\.kind 'coco' needs data\.root"),
    ],
)
def test_data_settings_are_checked(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_datasets(load_run_config(None, overrides))


@pytest.mark.parametrize("case", ["zero-width box", "truncated image"])
def test_cli_names_the_file_and_id_in_one_line(tmp_path: Path, case: str) -> None:
    data = _coco_folder(tmp_path, [10, 4, 0, 6] if case == "zero-width box" else [10, 4, 5, 6])
    if case == "truncated image":
        Image.new("RGB", (32, 24)).save(tmp_path / "img" / "a.png", format="JPEG")
        (tmp_path / "img" / "a.png").write_bytes((tmp_path / "img" / "a.png").read_bytes()[:-9])
    args = [f"--{k}={v}" for k, v in data.items()]
    done = subprocess.run(
        [sys.executable, "-m", "hardmine.cli", "train", *args, "--output_dir", str(tmp_path / "r")],
        capture_output=True,
        text=True,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr
    assert str(tmp_path / "ann.json") in lines[0]
    assert "image id 5" in lines[0] or "annotation id 9" in lines[0]
