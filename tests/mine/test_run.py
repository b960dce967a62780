"""Mining a real (tiny, untrained) detector, a training step with mined boxes, a bootstrap round."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

import pytest
import torch

from hardmine.boxes import box_iou
from hardmine.config import ComponentConfig
from hardmine.data import (
    HardNegativeDataset,
    SceneDataset,
    load_hard_negatives,
    save_hard_negatives,
)
from hardmine.mine import detect, mine, mine_run
from hardmine.models import build
from hardmine.sample import MinedNegativeSampler, RandomSampler


@pytest.fixture(scope="module")
def scenes() -> SceneDataset:
    return SceneDataset(3, seed=0, image_size=64, num_classes=3)


@pytest.fixture(scope="module")
def detector() -> torch.nn.Module:
    torch.manual_seed(0)
    return build("faster_rcnn_tiny", 4).eval()


def test_mined_boxes_are_false_positives(scenes, detector, tmp_path):
    detections = detect(detector, scenes, device="cpu")
    assert sum(d.boxes.shape[0] for d in detections) > 0  # an untrained detector fires anywhere
    hard = mine(detector, scenes, device="cpu", top_k=5, source="untrained")
    assert sorted(hard.images) == [1, 2, 3]
    assert 0 < hard.num_boxes <= 15
    for index in range(len(scenes)):
        _, target = scenes[index]
        mined = hard.images[target["image_id"]]
        assert mined.boxes.shape[0] <= 5
        assert (mined.scores.diff() <= 0).all()
        if target["boxes"].shape[0] and mined.boxes.shape[0]:
            assert (box_iou(mined.boxes, target["boxes"]) < 0.5).all()
    loaded = load_hard_negatives(save_hard_negatives(hard, tmp_path / "hn.json"))
    assert loaded.num_boxes == hard.num_boxes and loaded.source == "untrained"


@dataclass
class Recorder:
    """Records what the RoI heads give a mined-aware sampler and what it picks."""

    sampler: MinedNegativeSampler
    calls: list = field(default_factory=list)
    needs_losses: bool = False

    def __call__(self, boxes, assignments, *, losses=None, generator=None, mined=None):
        selections = self.sampler(
            boxes, assignments, losses=losses, generator=generator, mined=mined
        )
        self.calls.append((boxes, assignments, mined, selections))
        return selections


def test_mined_boxes_are_picked_in_training(scenes, detector):
    hard = mine(detector, scenes, device="cpu", top_k=8)
    recorder = Recorder(MinedNegativeSampler(RandomSampler(num=64), share=0.25))
    torch.manual_seed(0)
    model = build("faster_rcnn_tiny", 4, sampler=recorder).train()
    images, targets = zip(*(HardNegativeDataset(scenes, hard)[i] for i in range(3)), strict=True)
    losses = model(list(images), list(targets))
    sum(losses.values()).backward()

    ((boxes, assignments, mined, selections),) = recorder.calls
    scale = 128 / 64  # the tiny detector resizes the 64-px scenes to 128 px
    for index, (b, a, m, s) in enumerate(zip(boxes, assignments, mined, selections, strict=True)):
        file_boxes = hard.images[index + 1].boxes
        assert torch.allclose(b[m], file_boxes * scale, atol=1e-3)  # appended, in place
        negatives = int((s.mask & a.negative).sum())
        mined_negatives = int((m & a.negative).sum())
        picked = int((s.mask & m & a.negative).sum())
        assert picked == min(int(0.25 * negatives), mined_negatives)
    assert sum(int((s.mask & m).sum()) for m, s in zip(mined, selections, strict=True)) > 0


def test_bootstrap_round_trip(tmp_path):
    from hardmine.config import config_from_dict
    from hardmine.mine.run import bootstrap

    config = config_from_dict(
        {
            "model": {"name": "faster_rcnn_tiny"},
            "sampler": {"name": "random", "num": 64},
            "data": {"num_train": 4, "num_val": 3, "image_size": 64, "batch_size": 2},
            "train": {"epochs": 1, "warmup_steps": 1, "log_every": 1, "eval_every": 0},
            "device": "cpu",
        }
    )
    results = bootstrap(config, rounds=2, output_dir=tmp_path, top_k=4)
    assert [r.round for r in results] == [0, 1]
    first, second = results
    assert first.trained_with == 0 and second.mined is None
    assert (
        second.trained_with
        == first.mined
        == load_hard_negatives(tmp_path / "round0" / "hard_negatives.json").num_boxes
    )
    assert first.mined <= 4 * 4
    assert (
        str(tmp_path / "round0" / "hard_negatives.json")
        in (tmp_path / "round1" / "config.yaml").read_text()
    )
    report = json.loads((tmp_path / "bootstrap.json").read_text())
    assert len(report["rounds"]) == 2
    assert "| 1 |" in (tmp_path / "bootstrap.md").read_text()
    # A rerun skips the finished rounds and reports the same numbers.
    assert bootstrap(config, rounds=2, output_dir=tmp_path, top_k=4) == results

    # Issue 12: a rerun with other settings kept round 1's training but overwrote the file it
    # was trained with. It is refused, by name, and nothing is written.
    from hardmine.errors import RunError

    consumed = tmp_path / "round0" / "hard_negatives.json"
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(RunError, match=r"mined with other settings \(--top-k: 4 -> 2\)"):
        bootstrap(config, rounds=2, output_dir=tmp_path, top_k=2)
    with pytest.raises(RunError, match=r"round1 was trained with other settings .*share"):
        bootstrap(config, rounds=2, output_dir=tmp_path, top_k=4, share=0.5)
    with pytest.raises(RunError, match=r"round0 was trained with other settings .*sampler.num"):
        bootstrap(replace(config, sampler=ComponentConfig("random", {"num": 32})), rounds=3,
                  output_dir=tmp_path, top_k=4)  # fmt: skip
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    # `hardmine mine` will not overwrite it with other settings either.
    with pytest.raises(RunError, match="mined with other settings"):
        mine_run(tmp_path / "round0", top_k=1, device="cpu")
    assert consumed.read_bytes() == before[consumed]

    # `hardmine mine` on the finished round 0, with both strategies.
    from hardmine.cli import main

    output = tmp_path / "cli.json"
    argv = ["mine", "--run", str(tmp_path / "round0"), "--output", str(output), "--device", "cpu"]
    assert main([*argv, "--top-k", "2", "--score-thr", "0.06"]) == 0
    mined = load_hard_negatives(output)
    assert sorted(mined.images) == [1, 2, 3, 4]
    assert all(m.boxes.shape[0] <= 2 and (m.scores >= 0.06).all() for m in mined.images.values())
