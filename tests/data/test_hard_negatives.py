"""The hard-negatives file: round trip, and errors that name the file and the entry."""

from __future__ import annotations

import json

import pytest
import torch

from hardmine.data import (
    HardNegatives,
    HardNegativesFormatError,
    MinedBoxes,
    load_hard_negatives,
    save_hard_negatives,
)


def _example() -> HardNegatives:
    return HardNegatives(
        images={
            3: MinedBoxes(
                boxes=torch.tensor([[1.0, 2.0, 30.5, 40.25], [0.0, 0.0, 5.0, 5.0]]),
                scores=torch.tensor([0.9, 0.25]),
                labels=torch.tensor([2, 1]),
            ),
            1: MinedBoxes.empty(),
        },
        source="runs/round0",
        settings={"iou_thr": 0.5, "top_k": 10, "score_thr": None},
    )


def test_round_trip(tmp_path):
    path = save_hard_negatives(_example(), tmp_path / "sub" / "hn.json")
    loaded = load_hard_negatives(path)
    assert loaded.source == "runs/round0"
    assert dict(loaded.settings) == {"iou_thr": 0.5, "top_k": 10, "score_thr": None}
    assert sorted(loaded.images) == [1, 3]
    assert torch.allclose(loaded.boxes_of(3), _example().boxes_of(3))
    assert torch.allclose(loaded.images[3].scores, torch.tensor([0.9, 0.25]))
    assert loaded.images[3].labels.tolist() == [2, 1]
    assert loaded.boxes_of(1).shape == (0, 4)
    assert loaded.boxes_of(99).shape == (0, 4)  # an image that was not mined
    assert loaded.num_boxes == 2
    assert not list(tmp_path.glob("sub/.*tmp"))  # the temporary file is gone


def _document() -> dict:
    return {
        "format": "hardmine-hard-negatives",
        "version": 1,
        "source": "x",
        "settings": {},
        "images": [{"image_id": 7, "boxes": [[0, 0, 4, 4]], "scores": [0.5], "labels": [1]}],
    }


def _entry(**changes) -> dict:
    document = _document()
    document["images"][0] |= changes
    return document


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("{not json", "not valid JSON"),
        ({"images": []}, "not a hard-negatives file"),
        (_document() | {"version": 2}, "version 2"),
        (_document() | {"images": {}}, '"images" must be a list'),
        (_entry(image_id="7"), r"images\[0\]: image_id must be an integer"),
        (_entry(scores=[0.5, 0.4]), r"image_id 7\): 1 boxes, 2 scores and 1 labels"),
        (_entry(boxes=[[0, 0, 4]]), r"boxes\[0\] must be four finite numbers"),
        (_entry(boxes=[[0, 0, float("nan"), 4]]), "four finite numbers"),
        (_entry(boxes=[[5, 0, 4, 4]]), "not xyxy"),
        (_entry(labels=[1.5]), "labels must be integers"),
        (_document() | {"images": _document()["images"] * 2}, "duplicate image_id 7"),
    ],
)
def test_bad_files(tmp_path, document, message):
    path = tmp_path / "bad.json"
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    with pytest.raises(HardNegativesFormatError, match=message) as info:
        load_hard_negatives(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(HardNegativesFormatError, match="cannot read"):
        load_hard_negatives(tmp_path / "absent.json")
