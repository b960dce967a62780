import numpy as np
import pytest

from hardmine.engine.evaluate import coco_ap
from hardmine.report.errors import ERROR_TYPES, error_breakdown

# AP of one class with two ground truths when the detections by score are TP, FP, TP: precision 1
# up to recall 0.5 (COCO's recall thresholds 0.00-0.50, 51 of 101), 2/3 from there to 1.
AP_TP_FP_TP = (51 + 50 * 2 / 3) / 101


def _gt(*objects: tuple[int, list[float]], crowd: tuple[int, list[float]] | None = None) -> dict:
    """One image (id 1), objects as (category, xywh); categories 1 and 2."""
    anns = [
        {"id": k + 1, "image_id": 1, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
        for k, (c, b) in enumerate(objects)
    ]
    if crowd is not None:
        c, b = crowd
        anns.append(
            {
                "id": 99,
                "image_id": 1,
                "category_id": c,
                "bbox": b,
                "area": b[2] * b[3],
                "iscrowd": 1,
            }
        )
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    return {
        "images": [{"id": 1, "width": 300, "height": 300}],
        "annotations": anns,
        "categories": cats,
    }


def _det(category: int, xywh: list[float], score: float) -> dict:
    return {"image_id": 1, "category_id": category, "bbox": xywh, "score": score}


def _only(breakdown, error: str, delta: float) -> None:
    """``error`` costs ``delta``; every other type costs nothing."""
    for t in ERROR_TYPES:
        assert breakdown.delta[t] == pytest.approx(delta if t == error else 0.0, abs=1e-9), t


G1, G2 = [0, 0, 10, 10], [50, 50, 10, 10]
HALF_OFF = [5, 0, 10, 10]  # IoU 1/3 with G1


def test_classification_error() -> None:
    result = error_breakdown(_gt((1, G1)), [_det(2, G1, 0.9)])
    assert result.ap50 == 0.0 and result.counts["cls"] == 1 and result.counts["miss"] == 0
    _only(result, "cls", 1.0)


def test_localisation_error() -> None:
    result = error_breakdown(_gt((1, G1)), [_det(1, HALF_OFF, 0.9)])
    assert result.ap50 == 0.0 and result.counts["loc"] == 1 and result.counts["miss"] == 0
    _only(result, "loc", 1.0)


def test_only_the_best_scoring_error_on_a_ground_truth_is_fixed() -> None:
    dets = [_det(1, HALF_OFF, 0.9), _det(1, [0, 5, 10, 10], 0.8)]
    result = error_breakdown(_gt((1, G1)), dets)
    assert result.counts["loc"] == 2
    _only(result, "loc", 1.0)  # one becomes the true positive, the other is removed


def test_both_error() -> None:
    # Class 2 ranks a box half off a class-1 object above its own true positive: AP_2 = 0.5.
    gt = _gt((1, G1), (2, G2))
    dets = [_det(1, G1, 0.5), _det(2, HALF_OFF, 0.9), _det(2, G2, 0.5)]
    result = error_breakdown(gt, dets)
    assert result.ap50 == pytest.approx(0.75) and result.counts["both"] == 1
    _only(result, "both", 0.25)


def test_duplicate_error() -> None:
    gt = _gt((1, G1), (1, G2))
    dets = [_det(1, G1, 0.9), _det(1, [0, 1, 10, 10], 0.8), _det(1, G2, 0.7)]
    result = error_breakdown(gt, dets)
    assert result.ap50 == pytest.approx(AP_TP_FP_TP) and result.counts["dupe"] == 1
    _only(result, "dupe", 1 - AP_TP_FP_TP)


def test_background_error_on_a_look_alike_and_on_clutter() -> None:
    gt = _gt((1, G1), (1, G2))
    dets = [_det(1, G1, 0.9), _det(1, [200, 200, 10, 10], 0.8), _det(1, G2, 0.7)]
    lookalike = {1: np.array([[201.0, 200.0, 211.0, 210.0]])}  # IoU 0.82 with the false positive
    result = error_breakdown(gt, dets, lookalikes=lookalike)
    assert result.counts["bkg"] == 1
    _only(result, "bkg", 1 - AP_TP_FP_TP)
    assert result.background == {"lookalike": 1, "clutter": 0}
    assert result.background_delta["lookalike"] == pytest.approx(1 - AP_TP_FP_TP)
    assert result.background_delta["clutter"] == 0.0
    elsewhere = error_breakdown(gt, dets, lookalikes={1: np.array([[100.0, 100, 120, 120]])})
    assert elsewhere.background == {"lookalike": 0, "clutter": 1}
    assert error_breakdown(gt, dets).background == {}


def test_missed_object() -> None:
    result = error_breakdown(_gt((1, G1), (1, G2)), [_det(1, G1, 0.9)])
    assert result.ap50 == pytest.approx(51 / 101) and result.counts["miss"] == 1
    _only(result, "miss", 1 - 51 / 101)


def test_detection_on_a_crowd_region_is_ignored() -> None:
    gt = _gt((1, G1), crowd=(1, [100, 100, 50, 50]))
    dets = [_det(1, [110, 110, 10, 10], 0.95), _det(1, G1, 0.9)]
    result = error_breakdown(gt, dets)
    assert result.ap50 == pytest.approx(1.0) and sum(result.counts.values()) == 0


def _random_case(seed: int) -> tuple[dict, list[dict]]:
    """15 images, two classes, crowd regions, detections near objects (some of the wrong class)
    and anywhere."""
    rng = np.random.default_rng(seed)
    images, anns, dets = [], [], []
    for i in range(1, 16):
        images.append({"id": i, "width": 100, "height": 100})
        for _ in range(rng.integers(0, 4)):
            x, y, w, h = *rng.uniform(0, 70, 2), *rng.uniform(5, 30, 2)
            c = int(rng.integers(1, 3))
            crowd = int(rng.random() < 0.15)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": c,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": crowd,
                }
            )
            for _ in range(rng.integers(0, 3)):
                j = rng.normal(0, 0.2, 4) * [w, h, w, h]
                box = [x + j[0], y + j[1], max(w + j[2], 1), max(h + j[3], 1)]
                category = int(rng.integers(1, 3)) if rng.random() < 0.3 else c
                dets.append(
                    {"image_id": i, "category_id": category, "bbox": box, "score": rng.random()}
                )
        for _ in range(rng.integers(0, 4)):
            box = [*rng.uniform(0, 80, 2), *rng.uniform(3, 30, 2)]
            category = int(rng.integers(1, 3))
            dets.append(
                {"image_id": i, "category_id": category, "bbox": box, "score": rng.random()}
            )
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    return {"images": images, "annotations": anns, "categories": cats}, dets


def test_ap50_is_cocos_on_random_detections() -> None:
    for seed in range(3):
        gt, dets = _random_case(seed)
        result = error_breakdown(gt, dets)
        assert result.ap50 == pytest.approx(coco_ap(gt, dets)["AP50"], abs=1e-12)
        assert 0 < result.ap50 < 1 and all(v >= 0 for v in result.delta.values())


# TIDE's own package (tidecv 1.0.1, in a separate environment: it needs OpenCV) on
# ``_random_case(0)``: ground truths by ``add_ground_truth``, crowd regions by
# ``add_ignore_region``, every image by ``add_image``; ``TIDE().evaluate(..., mode=TIDE.BOX)``,
# ``get_all_errors()["main"]``, in points.
TIDECV_CASE_0 = {
    "ap50": 7.557838559775707,
    "cls": 5.723985574054682,
    "loc": 15.632763959122794,
    "both": 1.2192092577880107,
    "dupe": 0.43538087494972366,
    "bkg": 4.276201987136133,
    "miss": 3.008460545051154,
}


def test_equals_tidecv_on_a_random_case() -> None:
    gt, dets = _random_case(0)
    result = error_breakdown(gt, dets)
    assert 100 * result.ap50 == pytest.approx(TIDECV_CASE_0["ap50"], abs=1e-6)
    for error in ERROR_TYPES:
        assert 100 * result.delta[error] == pytest.approx(TIDECV_CASE_0[error], abs=1e-6), error
