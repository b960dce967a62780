"""false_positives and fp_per_image_at_recall on hand-made cases with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from hardmine.boxes import box_iou
from hardmine.mine import ImageDetections, false_positives, fp_per_image_at_recall


def _image(boxes, scores, gt_boxes, *, labels=None, gt_labels=None, ignore=None, image_id=1):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    gt_boxes = torch.tensor(gt_boxes, dtype=torch.float32).reshape(-1, 4)
    return ImageDetections(
        image_id=image_id,
        boxes=boxes,
        scores=torch.tensor(scores, dtype=torch.float32),
        labels=torch.tensor(labels if labels is not None else [1] * len(boxes)),
        gt_boxes=gt_boxes,
        gt_labels=torch.tensor(gt_labels if gt_labels is not None else [1] * len(gt_boxes)),
        ignore_boxes=torch.tensor(ignore or [], dtype=torch.float32).reshape(-1, 4),
    )


GT = [[0, 0, 10, 10]]


def test_exact_case():
    image = _image(
        [
            [0, 0, 10, 10],  # IoU 1: a hit
            [0, 0, 10, 5],  # IoU exactly 0.5: not a false positive
            [0, 0, 10, 4],  # IoU 0.4: false positive
            [20, 20, 30, 30],  # IoU 0: false positive
            [50, 50, 60, 60],  # inside the ignore region: not a false positive
            [60, 0, 80, 20],  # IoU 0: false positive
        ],
        [0.9, 0.8, 0.3, 0.7, 0.95, 0.5],
        GT,
        ignore=[[45, 45, 70, 70]],
    )
    (kept,) = false_positives([image])
    assert kept.tolist() == [3, 5, 2]  # by descending score


def test_class_agnostic():
    # A confident box of class 2 right over a class-1 object is a misclassification, not
    # background: it is not mined.
    image = _image([[0, 0, 10, 10], [30, 30, 40, 40]], [0.9, 0.2], GT, labels=[2, 2])
    assert false_positives([image])[0].tolist() == [1]


def _random_batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    images = []
    for i, (d, g) in enumerate([(60, 3), (0, 2), (25, 0), (40, 5)]):
        xy = torch.rand(d, 2, generator=gen) * 80
        boxes = torch.cat([xy, xy + 5 + torch.rand(d, 2, generator=gen) * 30], 1)
        gxy = torch.rand(g, 2, generator=gen) * 80
        gts = torch.cat([gxy, gxy + 10 + torch.rand(g, 2, generator=gen) * 20], 1)
        boxes = torch.cat([boxes, gts[:2] + 1])  # near-hits too
        images.append(
            ImageDetections(
                image_id=i + 1,
                boxes=boxes,
                scores=torch.rand(boxes.shape[0], generator=gen),
                labels=torch.ones(boxes.shape[0], dtype=torch.int64),
                gt_boxes=gts,
                gt_labels=torch.ones(g, dtype=torch.int64),
                ignore_boxes=torch.zeros(0, 4),
            )
        )
    return images


def test_mined_are_false_positives_and_all_are_found():
    images = _random_batch()
    for image, kept in zip(images, false_positives(images), strict=True):
        iou = box_iou(image.boxes, image.gt_boxes)  # [D, G]
        best = iou.amax(1) if iou.shape[1] else torch.zeros(image.boxes.shape[0])
        assert (best[kept] < 0.5).all()
        assert set(kept.tolist()) == set(torch.nonzero(best < 0.5)[:, 0].tolist())
        assert (image.scores[kept].diff() <= 0).all()


@pytest.mark.parametrize(("top_k", "score_thr"), [(3, None), (None, 0.6), (2, 0.5), (0, None)])
def test_strategies_cap_as_stated(top_k, score_thr):
    images = _random_batch(1)
    every = false_positives(images)
    capped = false_positives(images, top_k=top_k, score_thr=score_thr)
    for image, all_fp, kept in zip(images, every, capped, strict=True):
        expected = [int(i) for i in all_fp if score_thr is None or image.scores[i] >= score_thr]
        if top_k is not None:
            expected = expected[:top_k]
        assert kept.tolist() == expected


def test_batched_equals_single():
    images = _random_batch(2)
    batched = false_positives(images, top_k=4, score_thr=0.2)
    for image, kept in zip(images, batched, strict=True):
        assert torch.equal(false_positives([image], top_k=4, score_thr=0.2)[0], kept)


def test_bad_input():
    with pytest.raises(ValueError, match="top_k"):
        false_positives(_random_batch(), top_k=-1)
    image = _image([[0, 0, 1, 1]], [0.5, 0.4], GT)
    with pytest.raises(ValueError, match=r"images\[0\].scores"):
        false_positives([image])
    assert false_positives([]) == []


def _two_images():
    first = _image(
        [[0, 0, 10, 10], [0, 0, 10, 9.5], [50, 50, 60, 60], [20, 0, 30, 10]],
        [0.9, 0.8, 0.7, 0.6],  # a hit, its duplicate, background, the second object
        [[0, 0, 10, 10], [20, 0, 30, 10]],
    )
    second = _image(
        [[0, 0, 10, 10], [0, 0, 10, 10]],
        [0.85, 0.5],  # the wrong class first, then the right one
        GT,
        labels=[1, 2],
        gt_labels=[2],
        image_id=2,
    )
    return [first, second]


@pytest.mark.parametrize(("recall", "expected"), [(0.3, 0.0), (0.5, 1.5), (1.0, 1.5)])
def test_fp_per_image_at_recall(recall, expected):
    # Sorted: .9 TP, .85 FP (wrong class), .8 FP (duplicate), .7 FP, .6 TP, .5 TP; 3 objects.
    assert fp_per_image_at_recall(_two_images(), recall=recall) == expected


def test_fp_per_image_unreached_and_ignored():
    first, second = _two_images()
    missing = _image([[0, 0, 10, 10]], [0.85], GT, labels=[1], gt_labels=[2], image_id=2)
    assert fp_per_image_at_recall([first, missing], recall=1.0) == math.inf
    # The background box at .7 inside an ignore region no longer counts.
    ignored = _image(
        first.boxes.tolist(),
        first.scores.tolist(),
        first.gt_boxes.tolist(),
        ignore=[[48, 48, 62, 62]],
    )
    assert fp_per_image_at_recall([ignored, second], recall=0.5) == 1.0
    with pytest.raises(ValueError, match="ground truth"):
        fp_per_image_at_recall([_image([], [], [])])
    with pytest.raises(ValueError, match="recall"):
        fp_per_image_at_recall([first], recall=0.0)
