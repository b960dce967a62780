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
