"""The ``model`` section of a run configuration, checked against the detector's settings."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hardmine.config import ConfigError
from hardmine.engine.build import load_run_config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model.bogus": 1}, r"unknown key 'model\.bogus'; valid keys: .*min_size"),
        ({"model.box_detections_per_imgs": 1}, r"did you mean 'box_detections_per_img'"),
        ({"model.min_size": "abc"}, r"model\.min_size: expected int \| list\[int\] \| None"),
        ({"model.max_size": 1.5}, r"model\.max_size: expected int, got 1\.5"),
        ({"model.rpn_head": "x"}, r"model\.rpn_head: expected Module \| None, got 'x'"),
        (
            {"model.score_dtype": "float64"},
            r"score_dtype: expected 'auto' \| 'bfloat16' \| 'float16' \|",
        ),
        ({"model.name": "fcos_tiny", "model.box_nms_thresh": 0.5}, r"did you mean 'nms_thresh'"),
        ({"model.name": "atss_tiny", "model.head": None}, r"unknown key 'model\.head'"),
    ],
)
def test_model_keys_and_types_are_checked(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_run_config(None, overrides)


def test_model_settings_that_apply_are_kept() -> None:
    config = load_run_config(
        None,
        {"model.min_size": [64, 80], "model.rpn_nms_thresh": 1, "model.score_dtype": "bfloat16"},
    )
    assert config.model.settings == {
        "min_size": [64, 80],
        "rpn_nms_thresh": 1.0,
        "score_dtype": "bfloat16",
    }
    config = load_run_config(
        None, {"model.name": "atss_fcos_tiny", "model.anchor_scale": 8, "sampler": None}
    )
    assert config.model.settings == {"anchor_scale": 8.0}


@pytest.mark.parametrize(
    ("args", "names"),
    [(["--model.bogus", "1"], "model.bogus"), (["--model.min_size", "abc"], "model.min_size")],
)
def test_cli_refuses_a_bad_model_key_in_one_line(args: list[str], names: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "hardmine.cli", "train", *args, "--output_dir", "never"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and names in lines[0] and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # Defect D8: ranges, checked when the configuration is read (before any work).
        ({"model.min_size": 0}, r"^model\.min_size: must be at least 1.*got 0$"),
        ({"model.min_size": [64, 0]}, r"^model\.min_size: .*got \[64, 0\]$"),
        ({"model.max_size": 0}, r"^model\.max_size: must be at least 1, got 0$"),
        ({"model.size_divisible": 0}, r"^model\.size_divisible: must be at least 1, got 0$"),
        ({"model.box_nms_thresh": 2}, r"^model\.box_nms_thresh: must be in \[0, 1\], got 2"),
        ({"model.rpn_nms_thresh": -0.1}, r"^model\.rpn_nms_thresh: must be in \[0, 1\]"),
        ({"model.box_score_thresh": "nan"}, r"^model\.box_score_thresh: must be in \[0, 1\]"),
        ({"model.box_positive_fraction": 1.5}, r"^model\.box_positive_fraction: must be in"),
        ({"model.rpn_post_nms_top_n_test": 0}, r"^model\.rpn_post_nms_top_n_test: must be at"),
        ({"model.box_detections_per_img": 0}, r"^model\.box_detections_per_img: must be at"),
        ({"model.box_batch_size_per_image": 0}, r"^model\.box_batch_size_per_image: must be at"),
        ({"model.image_std": [1, 0, 1]}, r"^model\.image_std: must be 3 numbers > 0"),
        ({"model.image_mean": [0.5]}, r"^model\.image_mean: must be 3 finite numbers"),
        ({"model.box_loss_beta": -1}, r"^model\.box_loss_beta: must be at least 0"),
        ({"model.weights": "foo"}, r"^model\.weights: must be null: faster_rcnn_tiny has no"),
        (
            {"model.name": "faster_rcnn_r50_fpn", "model.weights": "foo"},
            r"^model\.weights: must be null or one of COCO_V1, DEFAULT",
        ),
        (
            {"model.name": "faster_rcnn_r50_fpn", "model.weights_backbone": "x"},
            r"^model\.weights_backbone: must be null or one of IMAGENET1K_V1",
        ),
        (
            {"model.name": "faster_rcnn_r50_fpn", "model.trainable_backbone_layers": 6},
            r"^model\.trainable_backbone_layers: must be in 0\.\.5",
        ),
        ({"model.name": "fcos_tiny", "model.nms_thresh": 1.5}, r"^model\.nms_thresh: must be"),
        ({"model.name": "fcos_tiny", "model.topk_candidates": 0}, r"^model\.topk_candidates"),
        ({"model.name": "atss_fcos_tiny", "model.anchor_scale": 0}, r"^model\.anchor_scale"),
    ],
)
def test_model_values_are_range_checked(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_run_config(None, overrides)


def test_build_checks_the_same_ranges_and_the_number_of_classes() -> None:
    """The library entry point refuses what the configuration refuses (defects D8, D16)."""
    from hardmine.models import build

    with pytest.raises(ValueError, match=r"^size_divisible must be at least 1, got 0$"):
        build("faster_rcnn_tiny", 4, size_divisible=0)
    with pytest.raises(ValueError, match=r"^box_nms_thresh must be in \[0, 1\], got 2"):
        build("faster_rcnn_tiny", 4, box_nms_thresh=2.0)
    with pytest.raises(ValueError, match=r"^weights must be null: faster_rcnn_tiny"):
        build("faster_rcnn_tiny", 4, weights="DEFAULT")
    for name, low in (("faster_rcnn_tiny", 2), ("retinanet_tiny", 1)):
        with pytest.raises(ValueError, match=rf"num_classes must be an int of at least {low}"):
            build(name, low - 1)
    with pytest.raises(ValueError, match="num_classes"):
        build("faster_rcnn_tiny", 3.0)


def test_the_edges_of_the_model_ranges_are_valid() -> None:
    edges = {
        "model.min_size": [64, 80],
        "model.box_nms_thresh": 1,
        "model.box_score_thresh": 0.0,
        "model.size_divisible": 1,
        "model.box_loss_beta": 0.0,
        "model.image_std": [1, 1, 1],
    }
    assert load_run_config(None, edges).model.settings["box_nms_thresh"] == 1
    weights = {"model.name": "faster_rcnn_r50_fpn", "model.weights": "DEFAULT"}
    assert load_run_config(None, weights).model.settings["weights"] == "DEFAULT"  # no download
