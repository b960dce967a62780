import numpy as np
import pytest
import torch

from hardmine.data import CLASS_NAMES, SceneDataset, SceneDesign, collate_fn, make_scenes


@pytest.fixture(scope="module")
def scenes() -> SceneDataset:
    return SceneDataset(12, seed=3, with_masks=True)


def test_same_seed_same_scenes(scenes: SceneDataset) -> None:
    again = SceneDataset(4, seed=3)
    for i in range(4):
        (a, ta), (b, tb) = scenes[i], again[i]
        assert torch.equal(a, b)
        assert torch.equal(ta["boxes"], tb["boxes"])
        assert torch.equal(ta["labels"], tb["labels"])
        assert torch.equal(ta["ignore_boxes"], tb["ignore_boxes"])


def test_different_seeds_differ(scenes: SceneDataset) -> None:
    other = SceneDataset(2, seed=4)
    assert not torch.equal(scenes[0][0], other[0][0])
    assert not np.array_equal(scenes.scenes[1].boxes, other.scenes[1].boxes)


def test_items_follow_the_interface(scenes: SceneDataset) -> None:
    for index in range(len(scenes)):
        image, target = scenes[index]
        assert image.dtype == torch.float32 and image.shape == (3, 128, 128)
        assert image.min() >= 0 and image.max() <= 1
        boxes, labels = target["boxes"], target["labels"]
        assert boxes.dtype == torch.float32 and boxes.shape == (len(labels), 4)
        assert labels.dtype == torch.int64
        assert target["image_id"] == index + 1
        assert target["ignore_boxes"].dtype == torch.float32
        assert target["ignore_boxes"].shape[1] == 4
        masks = target["masks"]
        assert masks.dtype == torch.uint8 and masks.shape == (len(labels), 128, 128)


def test_boxes_inside_the_image_and_not_degenerate(scenes: SceneDataset) -> None:
    for _, target in scenes:
        for boxes in (target["boxes"], target["ignore_boxes"]):
            assert (boxes >= 0).all() and (boxes <= 128).all()
            assert (boxes[:, 2:] > boxes[:, :2]).all()


def test_masks_are_the_visible_pixels_inside_their_boxes(scenes: SceneDataset) -> None:
    _, target = scenes[0]
    for box, mask in zip(target["boxes"].long(), target["masks"], strict=True):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == box.tolist()
    # Painted back to front, so no pixel belongs to two objects.
    assert target["masks"].sum(0).max() <= 1


def test_classes_present_and_look_alikes_recorded(scenes: SceneDataset) -> None:
    labels = torch.cat([t["labels"] for _, t in scenes])
    assert set(labels.tolist()) == {1, 2, 3}
    assert scenes.categories == list(CLASS_NAMES[:3])
    for scene in scenes.scenes:
        assert len(scene.lookalike_boxes) == len(scene.lookalike_mimics)
        assert set(scene.lookalike_mimics.tolist()) <= {1, 2, 3}
        assert scene.crowd.shape == scene.labels.shape


def test_look_alikes_are_rare_by_default() -> None:
    facts = SceneDataset(64, seed=5, image_size=64).facts()
    # Design: no look-alike in 70 % of the images, one in 25 %, two in 5 %; 1-3 isolated objects
    # plus a crowd group of 2-3 in half of the images.
    assert 0.15 <= facts["images_with_lookalikes"] / 64 <= 0.45
    assert facts["lookalikes"] / 64 < 0.6 < 2 < facts["objects"] / 64


def test_every_image_gets_the_look_alikes_its_design_asks_for() -> None:
    always_two = SceneDesign(lookalikes=(0.0, 0.0, 1.0))
    scenes = SceneDataset(8, seed=2, image_size=64, design=always_two)
    assert [len(s.lookalike_boxes) for s in scenes.scenes] == [2] * 8
    none = SceneDataset(8, seed=2, image_size=64, design=SceneDesign(lookalikes=(1.0,)))
    assert sum(len(s.lookalike_boxes) for s in none.scenes) == 0


def test_crowd_groups_are_overlapping_instances_of_one_class() -> None:
    from hardmine.boxes import box_iou

    scenes = SceneDataset(8, seed=4, design=SceneDesign(p_crowd=1.0, crowd_size=(3, 3)))
    for scene in scenes.scenes:
        group = scene.crowd >= 0
        assert group.sum() >= 2  # three placed; one may end up less than half visible
        assert len(set(scene.labels[group].tolist())) == 1
        boxes = torch.from_numpy(scene.boxes[group])
        assert box_iou(boxes, boxes).fill_diagonal_(0).max() > 0.05
    alone = SceneDataset(8, seed=4, image_size=64, design=SceneDesign(p_crowd=0.0))
    assert all((s.crowd == -1).all() for s in alone.scenes)
    assert alone.facts()["crowd_groups"] == 0


def test_facts_count_what_the_scenes_hold() -> None:
    scenes = SceneDataset(40, seed=6)
    facts = scenes.facts()
    boxes = np.concatenate([s.boxes for s in scenes.scenes])
    areas = (boxes[:, 2:] - boxes[:, :2]).prod(1)
    assert facts["objects"] == len(boxes) == facts["small"] + facts["medium"] + facts["large"]
    # COCO's three size ranges all occur at 128 px.
    assert min(facts["small"], facts["medium"], facts["large"]) > 0
    assert facts["large"] == int((areas >= 96**2).sum())
    assert facts["crowded_objects"] == sum(int((s.crowd >= 0).sum()) for s in scenes.scenes)
    assert facts["crowd_groups"] == sum(bool((s.crowd >= 0).any()) for s in scenes.scenes)
    assert facts["lookalikes"] == sum(len(s.lookalike_boxes) for s in scenes.scenes)
    assert facts["clutter"] == sum(len(s.clutter_boxes) for s in scenes.scenes) > 0


def test_objects_overlap_somewhere(scenes: SceneDataset) -> None:
    from hardmine.boxes import box_iou

    best = 0.0
    for _, target in scenes:
        iou = box_iou(target["boxes"], target["boxes"]).fill_diagonal_(0)
        best = max(best, float(iou.max()) if iou.numel() else 0.0)
    assert best > 0.2


def test_coco_gt_matches_the_targets(scenes: SceneDataset) -> None:
    gt = scenes.coco_gt
    assert [c["id"] for c in gt["categories"]] == [1, 2, 3]
    assert len(gt["images"]) == len(scenes)
    _, target = scenes[2]
    anns = [a for a in gt["annotations"] if a["image_id"] == 3 and not a["iscrowd"]]
    xywh = torch.tensor([a["bbox"] for a in anns]).reshape(-1, 4)
    assert torch.equal(torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1), target["boxes"])
    assert [a["category_id"] for a in anns] == target["labels"].tolist()


def test_other_class_counts_and_bad_arguments() -> None:
    one = SceneDataset(3, seed=0, num_classes=1, image_size=64)
    assert one.categories == ["ring"]
    assert all((t["labels"] == 1).all() for _, t in one)
    with pytest.raises(ValueError, match="num_classes"):
        SceneDataset(1, seed=0, num_classes=5)


def test_make_scenes_rejects_unknown_split() -> None:
    with pytest.raises(ValueError, match="split"):
        make_scenes("test")  # type: ignore[arg-type]


def test_collate_fn(scenes: SceneDataset) -> None:
    images, targets = collate_fn([scenes[0], scenes[1]])
    assert len(images) == len(targets) == 2
    assert targets[1]["image_id"] == 2
