"""Resuming a run: exact at any step, for every sampler and with data workers; refused when the
configuration changed; nothing evaluated or logged twice; a killed write's leftovers cleaned."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from hardmine.config import load_config
from hardmine.engine import checkpoint
from hardmine.engine import train as train_module
from hardmine.engine.rundir import read_metrics
from hardmine.engine.train import Session, train
from hardmine.errors import RunError
from hardmine.sample import SAMPLERS

# Four 64-px scenes, two per step, two epochs: four steps. The RPN samples 32 of its ~250 anchors
# per image, so its draws from torch's global random state change the losses (with all anchors
# sampled, as with torchvision's 256, the order of the draws would not matter and a resume that
# shifts them would go unnoticed).
BASE: dict[str, Any] = {
    "model.name": "faster_rcnn_tiny",
    "model.min_size": 64,
    "model.max_size": 64,
    "model.rpn_batch_size_per_image": 32,
    "data.num_train": 4,
    "data.num_val": 2,
    "data.image_size": 64,
    "data.batch_size": 2,
    "train.epochs": 2,
    "train.lr": 0.01,
    "train.warmup_steps": 2,
    "train.log_every": 1,
    "train.eval_every": 0,
    "train.checkpoint_every": 1,
    "device": "cpu",
}


def config(tmp_path: Path, name: str, **overrides: Any):
    dotted = {k.replace("__", "."): v for k, v in overrides.items()}
    return load_config(None, {**BASE, "output_dir": str(tmp_path / name), **dotted})


class KilledError(Exception):
    """Stands for the kill -9 of a run right after the checkpoint of a given step."""


def train_killed_at(monkeypatch: pytest.MonkeyPatch, run_config: Any, step: int) -> None:
    save = Session.save_checkpoint

    def save_then_die(self: Session) -> None:
        save(self)
        if self.position.step == step:
            raise KilledError

    with monkeypatch.context() as patch:
        patch.setattr(Session, "save_checkpoint", save_then_die)
        with pytest.raises(KilledError):
            train(run_config)


def losses(run_dir: Path) -> list[dict[str, Any]]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


_WHOLE: dict[str, Any] = {}


def whole_run(tmp_path_factory: pytest.TempPathFactory, sampler: str) -> Any:
    """The uninterrupted run of ``sampler`` (num_workers 0), trained once per test session."""
    if sampler not in _WHOLE:
        folder = tmp_path_factory.mktemp(f"whole_{sampler}")
        _WHOLE[sampler] = train(config(folder, "run", sampler={"name": sampler, "num": 16}))
    return _WHOLE[sampler]


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_resume_mid_epoch_is_exact(
    sampler: str,
    num_workers: int,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """KilledError after step 3 (the first step of epoch 2, not an epoch boundary), resumed: every
    logged loss and the final weights equal the uninterrupted run's, bit for bit. Issue 12: step
    4 differed (the resumed epoch's DataLoader drew its base seed from the restored global RNG,
    from which torchvision's RPN sampler draws next)."""
    whole = whole_run(tmp_path_factory, sampler)
    split = config(
        tmp_path, "split", sampler={"name": sampler, "num": 16}, data__num_workers=num_workers
    )
    train_killed_at(monkeypatch, split, step=3)
    assert checkpoint.load(tmp_path / "split" / "checkpoint.pt")["position"] == {
        "epoch": 1,
        "epoch_step": 1,
        "step": 3,
    }
    resumed = train(split, resume=True)
    expected = losses(whole.run_dir)
    assert [r["step"] for r in expected] == [1, 2, 3, 4]
    assert losses(resumed.run_dir) == expected
    assert_same_weights(resumed.model, whole.model)


def test_log_rows_span_a_checkpoint_between_them(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row every 2 steps, killed after step 3: the resumed row of step 4 averages steps 3 and
    4 as the uninterrupted one does (the checkpoint holds the half-filled window)."""
    folder = tmp_path_factory.mktemp("whole_log2")
    sampler = {"name": "random", "num": 16}
    whole = train(config(folder, "run", sampler=sampler, train__log_every=2))
    split = config(tmp_path, "split", sampler=sampler, train__log_every=2)
    train_killed_at(monkeypatch, split, step=3)
    train(split, resume=True)
    rows = losses(whole.run_dir)
    assert [r["step"] for r in rows] == [2, 4]
    assert losses(tmp_path / "split") == rows


def test_settings_that_change_no_result_may_differ_on_resume(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resumed with evaluation switched on, other log and checkpoint intervals and two data
    workers: the steps are the uninterrupted run's (evaluation keeps the random states)."""
    whole = whole_run(tmp_path_factory, "random")
    split = config(tmp_path, "split", sampler={"name": "random", "num": 16})
    train_killed_at(monkeypatch, split, step=2)
    changed = config(
        tmp_path,
        "split",
        sampler={"name": "random", "num": 16},
        train__eval_every=1,
        train__checkpoint_every=0,
        data__num_workers=2,
    )
    resumed = train(changed, resume=True)
    assert losses(resumed.run_dir) == losses(whole.run_dir)
    assert_same_weights(resumed.model, whole.model)
    evals = [r["step"] for r in read_metrics(resumed.run_dir / "metrics.jsonl") if "eval" in r]
    assert evals == [2, 4]  # the end of epoch 1 (due on resume) and the end


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"sampler": {"name": "ohem", "num": 16}}, "sampler.name: 'random' -> 'ohem'"),
        ({"data.batch_size": 1}, "data.batch_size: 2 -> 1"),
        ({"model.name": "mask_rcnn_tiny"}, "model.name"),
        ({"train.lr": 0.02}, "train.lr: 0.01 -> 0.02"),
    ],
)
def test_resume_refuses_a_changed_configuration(
    change: dict[str, Any], named: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 12: a changed sampler continued silently, a changed batch size "finished" without a
    step, a changed model gave a state-dict traceback hundreds of keys long."""
    split = config(tmp_path, "split", sampler={"name": "random", "num": 16})
    train_killed_at(monkeypatch, split, step=1)
    saved = (tmp_path / "split" / "config.yaml").read_text()
    other = load_config(
        None,
        {**BASE, "sampler": {"name": "random", "num": 16}, **change}
        | {"output_dir": str(tmp_path / "split")},
    )
    with pytest.raises(RunError, match="--resume with settings other than the run's") as error:
        train(other, resume=True)
    assert named in str(error.value)
    assert "\n" not in str(error.value)
    assert (tmp_path / "split" / "config.yaml").read_text() == saved  # not rewritten


def test_resuming_a_finished_run_changes_nothing(tmp_path: Path) -> None:
    """Issue 12: it appended a second evaluation row."""
    run_config = config(tmp_path, "run", sampler={"name": "random", "num": 16}, train__eval_every=2)
    first = train(run_config)
    files = {p: p.read_bytes() for p in (first.run_dir).glob("*.*") if p.is_file()}
    again = train(run_config, resume=True)
    assert again.finished_before and again.metrics == first.metrics
    assert {p: p.read_bytes() for p in files} == files
    assert_same_weights(again.model, first.model)


def test_a_half_written_last_metrics_line_does_not_block_resume(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 12: the killed row's half line made --resume fail with a JSONDecodeError."""
    whole = whole_run(tmp_path_factory, "random")
    split = config(tmp_path, "split", sampler={"name": "random", "num": 16})
    train_killed_at(monkeypatch, split, step=3)
    with (tmp_path / "split" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "epoch": 2, "loss": 1.2')  # killed mid-write
    train(split, resume=True)
    assert losses(tmp_path / "split") == losses(whole.run_dir)


def test_a_damaged_line_inside_metrics_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not valid JSON"):
        read_metrics(path)


def test_a_killed_checkpoint_write_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write killed before its rename leaves ``.checkpoint.pt.<random>.tmp`` (full size): the
    run removes it when it starts or resumes."""
    split = config(tmp_path, "split", sampler={"name": "random", "num": 16})
    train_killed_at(monkeypatch, split, step=1)
    run_dir = tmp_path / "split"
    stale = run_dir / ".checkpoint.pt.k1ll3d.tmp"
    stale.write_bytes((run_dir / "checkpoint.pt").read_bytes())
    other = run_dir / ".notes.txt.keep.tmp"  # not one of the run's files: left alone
    other.write_text("mine")
    train(split, resume=True)
    assert not stale.exists() and other.exists()
    assert not list(run_dir.glob(".checkpoint.pt.*.tmp"))


def test_checkpoints_are_readable_by_others_as_the_umask_allows(tmp_path: Path) -> None:
    """Issue 12: mkstemp's 0o600 left checkpoints and hard-negative files owner-only, unlike
    every other output."""
    import hardmine._atomic as atomic
    from hardmine.data import HardNegatives, save_hard_negatives

    old = os.umask(0o022)
    importlib.reload(atomic)  # it reads the umask once, when imported
    try:
        checkpoint.save_atomic({"x": torch.zeros(1)}, tmp_path / "checkpoint.pt")
        save_hard_negatives(HardNegatives(images={}), tmp_path / "hard_negatives.json")
    finally:
        os.umask(old)
        importlib.reload(atomic)
    for name in ("checkpoint.pt", "hard_negatives.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


def test_metrics_hold_no_nan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 12: ``"roi_loss": NaN`` (not JSON) when no RoI was counted."""
    monkeypatch.setattr(train_module, "mean_loss_all_rois", lambda *a, **k: float("nan"))
    result = train(
        config(tmp_path, "run", sampler={"name": "random", "num": 16}, train__eval_every=1)
    )
    text = (result.run_dir / "metrics.jsonl").read_text()
    assert "NaN" not in text
    rows = [json.loads(line) for line in text.splitlines()]  # strict JSON
    assert [r["roi_loss"] for r in rows if "eval" in r] == [None, None]


def test_num_workers_is_capped_by_the_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 12: the shipped configurations' num_workers 4 made PyTorch warn on a 2-core
    machine. The cap changes no result (test_resume_mid_epoch_is_exact: 0 and 2 workers give the
    same losses)."""
    monkeypatch.setattr(train_module, "available_cpus", lambda: 2)
    assert train_module.num_workers(load_config(None, {"data.num_workers": 4})) == 2
    assert train_module.num_workers(load_config(None, {"data.num_workers": 1})) == 1


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_with_images_without_objects_is_exact(
    num_workers: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A training set with a folder of images without objects (a share of each epoch, the folder
    images changing from epoch to epoch) resumes exactly too: the epoch's folder images are
    chosen before its loader (and its workers) copy the set."""
    from hardmine.data.background import write_background_images

    write_background_images(tmp_path / "bg", 3, image_size=64)
    extra = {"negative_images": str(tmp_path / "bg"), "negative_image_share": 0.5}
    whole = train(config(tmp_path, "whole", **extra))
    split = config(tmp_path, "split", data__num_workers=num_workers, **extra)
    train_killed_at(monkeypatch, split, step=5)  # four images and four folder images an epoch
    resumed = train(split, resume=True)
    expected = losses(whole.run_dir)
    assert [r["step"] for r in expected] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert losses(resumed.run_dir) == expected
    assert_same_weights(resumed.model, whole.model)


def _negatives(path: Path, boxes: list[list[float]]) -> Path:
    """A version-1 hard-negatives file with ``boxes`` on scene 1 (of four 64-px scenes)."""
    from hardmine.data import HardNegatives, MinedBoxes, save_hard_negatives

    mined = MinedBoxes(
        torch.tensor(boxes), torch.full((len(boxes),), 0.9), torch.ones(len(boxes), dtype=int)
    )
    return save_hard_negatives(HardNegatives(images={1: mined}, source="test"), path)


def test_resume_refuses_a_hard_negatives_file_changed_since_the_run_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """S12: only the path was compared, so an edited file trained on silently. The checkpoint
    records the file's SHA-256 when the run starts; the same content resumes."""
    path = _negatives(tmp_path / "hn.json", [[5.0, 5.0, 30.0, 30.0], [30.0, 30.0, 60.0, 60.0]])
    run_config = config(tmp_path, "run", hard_negatives=str(path))
    train_killed_at(monkeypatch, run_config, step=1)
    state = checkpoint.load(tmp_path / "run" / "checkpoint.pt")
    assert set(state["digests"]) == {"hard_negatives"}
    _negatives(path, [[5.0, 5.0, 30.0, 30.0]])
    with pytest.raises(RunError, match=r"hard_negatives .*hn.json changed since the run started"):
        train(run_config, resume=True)
    _negatives(path, [[5.0, 5.0, 30.0, 30.0], [30.0, 30.0, 60.0, 60.0]])  # as it was
    assert train(run_config, resume=True).run_dir == tmp_path / "run"


def test_resume_without_a_checkpoint_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """S12: --resume on a folder without a run started afresh without a word."""
    run_config = config(tmp_path, "fresh", train__max_steps=1)
    with caplog.at_level("INFO", logger="hardmine"):
        train(run_config, resume=True)
    said = [
        r.getMessage() for r in caplog.records if "has no checkpoint to resume" in r.getMessage()
    ]
    assert said == [f"{tmp_path / 'fresh'} has no checkpoint to resume: the run starts at step 0"]


def test_mining_an_unfinished_run_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """S12: mining a run without results.json (killed, or still training) gave no note."""
    from hardmine.mine import mine_run

    run_config = config(tmp_path, "run")
    train_killed_at(monkeypatch, run_config, step=1)
    with caplog.at_level("WARNING", logger="hardmine"):
        mine_run(tmp_path / "run", device="cpu", top_k=1)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == [
        f"{tmp_path / 'run'} has not finished (no results.json): mining the detector of its "
        "checkpoint at step 1"
    ]
