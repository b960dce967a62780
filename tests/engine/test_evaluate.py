import json
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign

from hardmine.data import SceneDataset, collate_fn
from hardmine.engine.evaluate import coco_ap, evaluate


def _gt(boxes: list[list[float]], crowd: list[list[float]] | None = None) -> dict[str, Any]:
    """One 100 × 100 image, one class, medium-sized ``[x, y, w, h]`` boxes."""
    anns = [
        {"id": i + 1, "image_id": 1, "category_id": 1, "bbox": b, "area": b[2] * b[3],
         "iscrowd": int(i >= len(boxes))}
        for i, b in enumerate(boxes + (crowd or []))
    ]  # fmt: skip
    return {
        "images": [{"id": 1, "width": 100, "height": 100, "file_name": "x.png"}],
        "annotations": anns,
        "categories": [{"id": 1, "name": "thing"}],
    }


def _det(box: list[float], score: float = 0.9) -> dict[str, Any]:
    return {"image_id": 1, "category_id": 1, "bbox": box, "score": score}


GT_BOXES = [[10.0, 10.0, 40.0, 40.0], [55.0, 55.0, 40.0, 40.0]]


def test_perfect_detections_give_one() -> None:
    ap = coco_ap(_gt(GT_BOXES), [_det(b) for b in GT_BOXES])
    assert ap["AP"] == ap["AP50"] == ap["AP75"] == ap["APm"] == 1.0
    # No ground truth of those sizes: COCO's -1, which printed as "APl -100.0", is None.
    assert ap["APs"] is None and ap["APl"] is None
    assert json.loads(json.dumps(ap, allow_nan=False))["APl"] is None


def test_no_detections_give_zero() -> None:
    ap = coco_ap(_gt(GT_BOXES), [])
    assert ap["AP"] == ap["AP50"] == 0.0


def test_half_found_gives_half_on_coco_recall_grid() -> None:
    # Precision 1 up to recall 0.5, then nothing: 51 of COCO's 101 recall points.
    ap = coco_ap(_gt(GT_BOXES), [_det(GT_BOXES[0])])
    assert ap["AP50"] == pytest.approx(51 / 101)


def test_false_positive_ranked_first_halves_precision() -> None:
    # Ranked list: miss, hit, hit -> interpolated precision 2/3 at every recall level.
    dets = [_det([0.0, 60.0, 20.0, 20.0], 0.99), _det(GT_BOXES[0], 0.8), _det(GT_BOXES[1], 0.7)]
    assert coco_ap(_gt(GT_BOXES), dets)["AP50"] == pytest.approx(2 / 3)


def test_detection_on_a_crowd_region_is_not_a_false_positive() -> None:
    gt = _gt(GT_BOXES[:1], crowd=[[55.0, 55.0, 40.0, 40.0]])
    dets = [_det([60.0, 60.0, 30.0, 30.0], 0.99), _det(GT_BOXES[0], 0.5)]
    assert coco_ap(gt, dets)["AP50"] == 1.0


def test_inputs_are_not_modified() -> None:
    gt, dets = _gt(GT_BOXES), [_det(GT_BOXES[0])]
    before = (repr(gt), repr(dets))
    coco_ap(gt, dets)
    assert (repr(gt), repr(dets)) == before


def test_only_given_images_are_evaluated() -> None:
    gt = _gt(GT_BOXES)
    gt["images"].append({"id": 2, "width": 100, "height": 100, "file_name": "y.png"})
    gt["annotations"].append({**gt["annotations"][0], "id": 9, "image_id": 2})
    dets = [_det(b) for b in GT_BOXES]
    assert coco_ap(gt, dets)["AP50"] < 1.0
    assert coco_ap(gt, dets, image_ids=[1])["AP50"] == 1.0


class _TinyBackbone(nn.Sequential):
    out_channels = 8

    def __init__(self) -> None:
        super().__init__(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU())


def _tiny_model(num_classes: int) -> FasterRCNN:
    return FasterRCNN(
        _TinyBackbone(),
        num_classes=num_classes + 1,
        min_size=64,
        max_size=64,
        rpn_anchor_generator=AnchorGenerator(((16, 32),), ((1.0,),)),
        box_roi_pool=MultiScaleRoIAlign(["0"], output_size=3, sampling_ratio=1),
        representation_size=16,
        rpn_pre_nms_top_n_test=50,
        rpn_post_nms_top_n_test=20,
        box_score_thresh=0.0,
    )


def test_evaluate_runs_a_detector_on_scenes() -> None:
    torch.manual_seed(0)
    scenes = SceneDataset(3, seed=0, image_size=64)
    model = _tiny_model(len(scenes.categories)).train()
    metrics = evaluate(model, Subset(scenes, [0, 2]), device="cpu", batch_size=2)
    assert set(metrics) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert all(v is None or 0.0 <= v <= 1.0 for v in metrics.values())
    assert model.training  # mode restored

    loader = DataLoader(scenes, batch_size=3, collate_fn=collate_fn)
    assert set(evaluate(model, loader, device="cpu")) == set(metrics)


def test_evaluate_handles_a_model_that_detects_nothing() -> None:
    scenes = SceneDataset(2, seed=0, image_size=64)

    def nothing(images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
        return [{**empty, "scores": torch.zeros(0)} for _ in images]

    model = nn.Module()
    model.forward = nothing  # type: ignore[method-assign]
    assert evaluate(model, scenes, device="cpu")["AP"] == 0.0


def test_an_oracle_scores_one_for_boxes_and_masks() -> None:
    scenes = SceneDataset(3, seed=1, image_size=64, with_masks=True)
    answers = iter([target for _, target in scenes])

    def oracle(images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        outputs = []
        for _ in images:
            target = next(answers)
            k = len(target["labels"])
            outputs.append(
                {
                    "boxes": target["boxes"],
                    "labels": target["labels"],
                    "scores": torch.ones(k),
                    "masks": target["masks"][:, None].float(),  # [K, 1, H, W] probabilities
                }
            )
        return outputs

    model = nn.Module()
    model.forward = oracle  # type: ignore[method-assign]
    metrics = evaluate(model, scenes, device="cpu", iou_types=("bbox", "segm"), batch_size=2)
    assert metrics["AP"] == metrics["mask_AP"] == 1.0


def test_eval_overrides_that_inference_does_not_read_are_refused() -> None:
    """Defect D9: training settings would change nothing in an evaluation, yet name its file."""
    from hardmine.config import ConfigError
    from hardmine.engine.evaluate import check_eval_overrides

    for key in (
        "model.box_loss_beta",
        "model.score_dtype",
        "model.rpn_post_nms_top_n_train",
        "model.box_batch_size_per_image",
        "model.box_fg_iou_thresh",
        "model.weights",
        "data.num_train",
        "data.train_ann",
        "data.num_classes",
    ):
        with pytest.raises(ConfigError, match=rf"^--{key}: a training setting"):
            check_eval_overrides({key: 1})
    inference = {
        "model.box_nms_thresh": 0.55,
        "model.box_score_thresh": 0.1,
        "model.min_size": 64,
        "model.rpn_post_nms_top_n_test": 100,
        "model.nms_thresh": 0.5,
        "data.val_ann": "x.json",
        "data.num_val": 4,
        "data.batch_size": 1,
    }
    check_eval_overrides(inference)  # no error
