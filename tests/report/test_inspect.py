"""``hardmine inspect``: jittered proposals, the driver's files, the command on a run directory."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import pytest
import torch
from torchvision.ops import box_iou

from hardmine.cli import inspect_command, inspect_parser
from hardmine.config import RunConfig, save_config
from hardmine.data import SceneDataset
from hardmine.engine import checkpoint
from hardmine.engine.build import PickCounter, build_datasets, build_detector
from hardmine.engine.rundir import CONFIG_NAME
from hardmine.models import build
from hardmine.report.inspect import (
    inspect_picks,
    jitter_proposals,
    samplers_for,
    showcase_images,
)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    inspect_parser(parser.add_subparsers())
    return parser.parse_args(["inspect", *argv])


def test_jitter_proposals_look_like_an_rpn_s() -> None:
    gt = torch.tensor([[10.0, 10.0, 50.0, 40.0], [60.0, 60.0, 120.0, 100.0]])
    boxes = jitter_proposals(gt, (110, 130), num=200, generator=torch.Generator().manual_seed(0))
    again = jitter_proposals(gt, (110, 130), num=200, generator=torch.Generator().manual_seed(0))
    assert torch.equal(boxes, again)
    assert 50 < boxes.shape[0] <= 200
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 130).all() and (boxes[:, 3] <= 110).all()
    iou = box_iou(boxes, boxes).fill_diagonal_(0)
    assert iou.max() <= 0.7 + 1e-6  # thinned by NMS
    best = box_iou(boxes, gt).amax(1)
    assert (best >= 0.5).sum() >= 4 and (best < 0.1).sum() >= 20  # objects and background
    assert jitter_proposals(torch.zeros(0, 4), (64, 64), num=50).shape[1] == 4


def test_inspect_picks_writes_everything(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build("faster_rcnn_tiny", 4)
    scenes = SceneDataset(3, seed=0, image_size=64)
    samplers = samplers_for(model, ["random", "ohem", "overlap"], num=32)
    result = inspect_picks(
        model, scenes, samplers, tmp_path, proposals="jitter", num_images=1, hist_images=3
    )
    assert len(result.panels) == 3
    for path in [
        *result.panels,
        result.sheet,
        result.overlaps,
        result.histogram_plot,
        result.histogram_csv,
    ]:
        assert path.exists() and path.stat().st_size > 0
    assert (tmp_path / "panels" / "image000_ohem.png").exists()
    hist = result.histograms
    with result.histogram_csv.open() as f:
        rows = list(csv.DictReader(f))
    for name in samplers:
        # 3 images, 32 picks each; random and overlap take at most a quarter positive.
        assert (0 if name == "ohem" else 3 * 24) <= hist.total(name) <= 3 * 32
        assert sum(int(r["count"]) for r in rows if r["sampler"] == name) == 2 * hist.total(name)
    panels = {p.name: p.read_bytes() for p in result.panels}
    assert panels["image000_random.png"] != panels["image000_overlap.png"]
    assert samplers_for(model, ["random"])["random"].num == 128  # the tiny heads' RoIs per image
    with pytest.raises(ValueError, match="unknown samplers"):
        samplers_for(model, ["nope"])
    with pytest.raises(ValueError, match="RoI heads"):
        samplers_for(build("retinanet_tiny", 4), ["random"])
    with pytest.raises(ValueError, match="RoI heads"):
        inspect_picks(build("retinanet_tiny", 4), scenes, samplers, tmp_path)


def test_command_on_a_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run directory as ``hardmine train`` leaves it; the RPN's proposals by default."""
    run = tmp_path / "run"
    config = RunConfig(output_dir=str(run))
    config.data.num_train, config.data.num_val, config.data.image_size = 2, 1, 64
    run.mkdir()
    save_config(config, run / CONFIG_NAME)
    torch.manual_seed(0)
    model = build_detector(config, len(build_datasets(config)[2]), PickCounter())
    checkpoint.save_atomic({"model": model.state_dict()}, run / checkpoint.CHECKPOINT_NAME)

    out = tmp_path / "out"
    options = ["--images", "1", "--hist-images", "2", "--samplers", "random,ohem", "--num", "16"]
    args = _parse(["--run", str(run), "--output", str(out), "--device", "cpu", *options])
    assert inspect_command(args, {}) == 0
    assert sorted(p.name for p in (out / "panels").iterdir()) == [
        "image000_ohem.png",
        "image000_random.png",
    ]
    assert (out / "overview.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "random:" in printed and "IoU(p,n) >= 0.5" in printed


def test_help_names_the_jitter_default() -> None:
    parser = argparse.ArgumentParser()
    inspect_parser(parser.add_subparsers())
    assert "jitter" in parser._subparsers._group_actions[0].choices["inspect"].format_help()
    args = _parse([])
    assert args.proposals is None and args.images == 4


def test_showcase_images_have_a_crowd_group_and_a_look_alike() -> None:
    scenes = SceneDataset(40, seed=0, image_size=64)
    chosen = showcase_images(scenes, 3)
    assert chosen is not None and len(chosen) == 3
    for k in chosen:
        scene = scenes.scenes[k]
        assert (scene.crowd >= 0).any() and len(scene.lookalike_boxes) > 0
    assert showcase_images(scenes, 1000) is None


def test_a_second_call_leaves_no_stale_panels(tmp_path: Path) -> None:
    """Issue 12: panels of an earlier call (more images, other samplers) stayed in the folder."""
    torch.manual_seed(0)
    model = build("faster_rcnn_tiny", 4)
    scenes = SceneDataset(2, seed=0, image_size=64)
    wide = samplers_for(model, ["random", "ohem"], num=16)
    inspect_picks(model, scenes, wide, tmp_path, proposals="jitter", num_images=2, hist_images=2)
    assert len(list((tmp_path / "panels").glob("*.png"))) == 4
    (tmp_path / "panels" / "notes.png").write_bytes(b"not ours")  # not a panel: kept
    narrow = samplers_for(model, ["random"], num=16)
    result = inspect_picks(
        model, scenes, narrow, tmp_path, proposals="jitter", num_images=1, hist_images=1
    )
    assert sorted(p.name for p in (tmp_path / "panels").iterdir()) == [
        "image000_random.png",
        "notes.png",
    ]
    assert [p.name for p in result.panels] == ["image000_random.png"]
