"""A folder of images without objects: listing, items, the epoch mix, mined boxes by path, the
version 2 hard-negatives file, and the generated object-free scenes."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hardmine.data import (
    HardNegativeDataset,
    HardNegatives,
    HardNegativesFormatError,
    MinedBoxes,
    load_hard_negatives,
    save_hard_negatives,
)
from hardmine.data.background import background_scene, write_background_images
from hardmine.data.folder import ImageFolder, NegativeImageMix, list_images
from hardmine.errors import DataError


def _png(path: Path, size=(20, 16), value=100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)
    return path


def _folder(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    _png(root / "b.png")
    _png(root / "a" / "z.PNG", size=(30, 10))
    _png(root / "a" / "y.jpg")
    _png(root / ".hidden" / "x.png")  # hidden folder: skipped
    _png(root / ".x.png")  # hidden file: skipped
    (root / "notes.txt").write_text("not an image")
    return root


def test_list_images_is_recursive_sorted_and_skips_hidden_and_other_files(tmp_path) -> None:
    assert list_images(_folder(tmp_path)) == ["a/y.jpg", "a/z.PNG", "b.png"]
    with pytest.raises(DataError, match="no such folder"):
        list_images(tmp_path / "missing")


def test_links_to_folders_are_not_followed(tmp_path) -> None:
    # S15 D6: ``up -> ..`` listed the same image 41 times; with a second link the walk hung.
    root = tmp_path / "loop"
    _png(root / "a.png")
    _png(tmp_path / "elsewhere" / "b.png")
    (root / "up").symlink_to("..")
    (root / "self").symlink_to(root)
    (root / "c.png").symlink_to(tmp_path / "elsewhere" / "b.png")  # a link to a file: taken
    assert list_images(root) == ["a.png", "c.png"]


def test_items_have_no_objects_and_ids_follow_the_paths(tmp_path) -> None:
    folder = ImageFolder(_folder(tmp_path), categories=["ring"], first_id=10)
    assert len(folder) == 3 and folder.ids == [10, 11, 12]
    image, target = folder[1]
    assert image.shape == (3, 10, 30) and image.dtype == torch.float32
    assert target["image_id"] == 11
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["ignore_boxes"].shape == (0, 4)
    coco = folder.coco_gt
    assert [im["file_name"] for im in coco["images"]] == ["a/y.jpg", "a/z.PNG", "b.png"]
    assert coco["images"][1] | {} == {"id": 11, "file_name": "a/z.PNG", "width": 30, "height": 10}
    assert coco["annotations"] == [] and coco["categories"] == [{"id": 1, "name": "ring"}]
    assert folder.path_of(12) == "b.png"


def test_a_bad_file_is_refused_by_name_and_an_empty_folder_too(tmp_path) -> None:
    root = _folder(tmp_path)
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DataError, match=r"broken\.jpg"):
        ImageFolder(root)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        ImageFolder(tmp_path / "empty")


def test_an_extreme_aspect_image_is_refused_by_name(tmp_path) -> None:
    # S15 D2: a 4000x10 strip crashed mine --images inside the resize (a short side of 0 px).
    root = tmp_path / "wide"
    _png(root / "ok.png")
    _png(root / "strip.png", size=(4000, 10))
    with pytest.raises(DataError, match=r"strip\.png: 4000x10 pixels, a long side more than 50"):
        ImageFolder(root)
    (root / "strip.png").unlink()
    _png(root / "tall.png", size=(10, 500))  # exactly 50 times: taken
    assert ImageFolder(root).files == ["ok.png", "tall.png"]


def _mix_parts(tmp_path: Path, num_folder: int = 5):
    root = tmp_path / "bg"
    for i in range(num_folder):
        _png(root / f"{i:02d}.png", value=10 * i)
    folder = ImageFolder(root, first_id=100)
    base = [(torch.zeros(3, 4, 4), {"image_id": k, "boxes": torch.zeros(0, 4)}) for k in range(6)]
    return base, folder


def test_the_share_is_the_fraction_of_each_epochs_images(tmp_path) -> None:
    base, folder = _mix_parts(tmp_path)
    mix = NegativeImageMix(base, folder, share=0.25, seed=0)
    assert len(mix) == 6 + 2  # 0.25 of 8
    assert mix[0][1]["image_id"] == 0
    assert NegativeImageMix(base, folder, share=0.5).per_epoch == 6
    assert len(NegativeImageMix(base, folder, share=0.0)) == 6
    with pytest.raises(ValueError, match="share"):
        NegativeImageMix(base, folder, share=1.0)


def test_epochs_walk_through_shuffled_passes_over_the_folder(tmp_path) -> None:
    base, folder = _mix_parts(tmp_path)
    mix = NegativeImageMix(base, folder, share=0.25, seed=3)
    seen = []
    for epoch in range(10):  # 2 a time: 20 = four passes over the 5 images
        mix.set_epoch(epoch)
        seen += [mix[i][1]["image_id"] for i in range(6, 8)]
    for p in range(4):
        assert sorted(seen[5 * p : 5 * p + 5]) == folder.ids  # each pass: every image once
    assert seen[:5] != seen[5:10]  # passes are shuffled apart
    again = NegativeImageMix(base, folder, share=0.25, seed=3)
    again.set_epoch(7)
    mix.set_epoch(7)
    assert [again[i][1]["image_id"] for i in (6, 7)] == [mix[i][1]["image_id"] for i in (6, 7)]
    other = NegativeImageMix(base, folder, share=0.25, seed=4)
    assert [other.folder_index(q) for q in range(5)] != [mix.folder_index(q) for q in range(5)]
    with pytest.raises(IndexError):
        mix[8]


def _mined(names: dict[int, str]) -> HardNegatives:
    box = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    return HardNegatives(
        images={i: MinedBoxes(box * i, torch.tensor([0.9]), torch.tensor([1])) for i in names},
        source="runs/r0",
        settings={"iou_thr": 0.5, "top_k": 5, "score_thr": None},
        file_names=names,
        folder="bg",
    )


def test_mined_boxes_are_matched_by_path_not_by_id(tmp_path) -> None:
    base, folder = _mix_parts(tmp_path)
    # Mined when the folder held other files: ids 1 and 2 named 03.png and 01.png.
    path = save_hard_negatives(_mined({1: "03.png", 2: "01.png"}), tmp_path / "hn.json")
    mix = NegativeImageMix(base, folder, share=0.5, mined=load_hard_negatives(path))
    by_file = {}
    for i in range(6, 12):
        _, target = mix[i]
        by_file[folder.path_of(target["image_id"])] = target["hard_negatives"]
    assert by_file["03.png"].tolist() == [[1.0, 1.0, 3.0, 3.0]]
    assert by_file["01.png"].tolist() == [[2.0, 2.0, 6.0, 6.0]]
    assert all(by_file[n].shape == (0, 4) for n in ("00.png", "02.png", "04.png"))
    with pytest.raises(ValueError, match="lacks"):
        NegativeImageMix(base, folder, share=0.5, mined=_mined({1: "elsewhere.png"}))
    dataset_mined = HardNegatives(images={1: MinedBoxes.empty()})
    with pytest.raises(ValueError, match="not a folder's"):
        NegativeImageMix(base, folder, share=0.5, mined=dataset_mined)


def test_a_mined_folder_is_version_2_and_version_1_still_reads(tmp_path) -> None:
    path = save_hard_negatives(_mined({1: "a/x.png", 2: "y.png"}), tmp_path / "hn.json")
    document = json.loads(path.read_text())
    assert document["version"] == 2 and document["folder"] == "bg"
    assert [e["file_name"] for e in document["images"]] == ["a/x.png", "y.png"]
    loaded = load_hard_negatives(path)
    assert dict(loaded.file_names) == {1: "a/x.png", 2: "y.png"}
    assert sorted(loaded.by_file_name()) == ["a/x.png", "y.png"]
    plain = save_hard_negatives(HardNegatives(images={4: MinedBoxes.empty()}), tmp_path / "v1.json")
    assert json.loads(plain.read_text())["version"] == 1
    assert load_hard_negatives(plain).file_names == {}
    # A version 2 entry without its file name is refused, naming the entry.
    del document["images"][1]["file_name"]
    path.write_text(json.dumps(document))
    with pytest.raises(HardNegativesFormatError, match=r"images\[1\].*file_name"):
        load_hard_negatives(path)
    document["version"] = 3
    path.write_text(json.dumps(document))
    with pytest.raises(HardNegativesFormatError, match="version 3"):
        load_hard_negatives(path)


def test_folder_boxes_are_not_applied_to_a_dataset_by_id() -> None:
    with pytest.raises(HardNegativesFormatError, match="negative_images"):
        HardNegativeDataset([], _mined({1: "x.png"}))


def test_background_scenes_are_deterministic_object_free_pngs(tmp_path) -> None:
    image, boxes, mimics = background_scene(100, 3, image_size=96, num_classes=2)
    again, _, _ = background_scene(100, 3, image_size=96, num_classes=2)
    assert image.shape == (96, 96, 3) and np.array_equal(image, again)
    assert 2 <= len(boxes) <= 4 and set(mimics.tolist()) <= {1, 2}
    assert ((boxes[:, 2:] > boxes[:, :2]) & (boxes >= 0).all(1, keepdims=True)).all()
    paths = write_background_images(tmp_path / "bg", 6, image_size=64)
    assert [p.name for p in paths] == [f"bg_{i:05d}.png" for i in range(6)]
    folder = ImageFolder(tmp_path / "bg")
    assert len(folder) == 6 and folder[0][0].shape == (3, 64, 64)
    counts = Counter(int(m) for i in range(40) for m in background_scene(100, i)[2])
    assert set(counts) == {1, 2, 3}  # look-alikes of every class
