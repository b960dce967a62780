"""Training runs: the run directory, seeded determinism, resume equivalence, non-finite losses."""

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from hardmine.config import RunConfig, load_config
from hardmine.data import SceneDataset, write_coco
from hardmine.engine import checkpoint
from hardmine.engine import train as train_module
from hardmine.engine.build import build_datasets
from hardmine.engine.evaluate import evaluate_run
from hardmine.engine.rundir import read_metrics
from hardmine.engine.train import NonFiniteLossError, lr_factor, train

# Four 64-px scenes, two per step: a run of a few steps takes seconds on a CPU.
TINY: dict[str, Any] = {
    "model": {"name": "faster_rcnn_tiny", "min_size": 64, "max_size": 64},
    "sampler": {"name": "random", "num": 32},
    "data": {"num_train": 4, "num_val": 2, "image_size": 64, "batch_size": 2},
    "train": {"epochs": 1, "lr": 0.01, "warmup_steps": 2, "log_every": 1, "eval_every": 0},
    "device": "cpu",
}


def tiny(tmp_path: Path, name: str = "run", **overrides: Any) -> RunConfig:
    """``TINY`` in ``tmp_path / name`` with dotted ``overrides`` (``train__epochs=2``)."""
    dotted = {k.replace("__", "."): v for k, v in overrides.items()}
    return load_config(None, {**_flat(TINY), "output_dir": str(tmp_path / name), **dotted})


def _flat(nested: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in nested.items():
        if isinstance(value, dict) and key not in ("model", "sampler"):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def losses(run_dir: Path) -> list[dict[str, float]]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def weights(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_run_directory(tmp_path: Path) -> None:
    result = train(tiny(tmp_path, train__eval_every=1, train__log_every=2))
    run = result.run_dir
    assert load_config(run / "config.yaml") == tiny(
        tmp_path, train__eval_every=1, train__log_every=2
    )
    rows = read_metrics(run / "metrics.jsonl")
    step_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in step_rows] == [2]  # 2 steps, one row per log_every = 2
    row = step_rows[0]
    for key in ("loss", "loss_classifier", "loss_box_reg", "loss_objectness", "lr", "epoch"):
        assert key in row
    assert row["picks"]["positive"] + row["picks"]["negative"] <= 32  # the sampler's num
    assert row["picks"]["positive"] > 0
    evals = [r["eval"] for r in rows if "eval" in r]
    assert len(evals) == 1 and {"AP", "AP50", "AP75"} <= evals[0].keys()
    assert result.metrics == evals[0]
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 2 and results["metrics"] == result.metrics
    assert (run / "plots" / "losses.png").stat().st_size > 0
    assert any((run / "tensorboard").iterdir())
    state = checkpoint.load(run / "checkpoint.pt")
    assert state["position"] == {"epoch": 0, "epoch_step": 2, "step": 2}
    assert_same_weights(state["model"], weights(result.model))

    assert evaluate_run(run, device="cpu") == pytest.approx(result.metrics)
    assert (run / "eval.json").exists()


def test_same_seed_same_losses_other_seed_other_losses(tmp_path: Path) -> None:
    a = train(tiny(tmp_path, "a"))
    b = train(tiny(tmp_path, "b"))
    c = train(tiny(tmp_path, "c", seed=1))
    assert losses(a.run_dir) == losses(b.run_dir)
    assert len(losses(a.run_dir)) == 2
    assert_same_weights(weights(a.model), weights(b.model))
    assert losses(a.run_dir) != losses(c.run_dir)


def test_resume_continues_as_if_never_stopped(tmp_path: Path) -> None:
    """4 scenes, 2 per step, 2 epochs: 4 steps; stopped after step 3 (mid-epoch), resumed."""
    whole = train(tiny(tmp_path, "whole", train__epochs=2))
    train(tiny(tmp_path, "split", train__epochs=2, train__max_steps=3))
    killed_state = checkpoint.load(tmp_path / "split" / "checkpoint.pt")
    assert killed_state["position"] == {"epoch": 1, "epoch_step": 1, "step": 3}
    resumed = train(tiny(tmp_path, "split", train__epochs=2), resume=True)
    assert_same_weights(weights(whole.model), weights(resumed.model))
    assert losses(whole.run_dir) == losses(resumed.run_dir)  # rows 1-3 kept, 4 the same


def test_resume_drops_rows_logged_after_the_checkpoint(tmp_path: Path) -> None:
    """A run killed between checkpoints logged steps that the resumed run takes again."""
    config = tiny(tmp_path)
    train(config)
    state = checkpoint.load(tmp_path / "run" / "checkpoint.pt")
    state["position"] = {"epoch": 0, "epoch_step": 1, "step": 1}  # as if killed after step 2
    checkpoint.save_atomic(state, tmp_path / "run" / "checkpoint.pt")
    (tmp_path / "run" / "results.json").unlink()
    train(config, resume=True)
    assert [r["step"] for r in losses(tmp_path / "run")] == [1, 2]


def test_existing_run_needs_resume(tmp_path: Path) -> None:
    config = tiny(tmp_path, train__max_steps=1)
    train(config)
    with pytest.raises(FileExistsError, match="--resume"):
        train(config)


class NaNAfter(nn.Module):
    """A detector whose losses become NaN from the ``bad_step``-th training forward on."""

    def __init__(self, model: nn.Module, bad_step: int) -> None:
        super().__init__()
        self.model, self.bad_step, self.calls = model, bad_step, 0

    def forward(self, images: list[Tensor], targets: Any = None) -> Any:
        out = self.model(images, targets)
        if self.training:
            self.calls += 1
            if self.calls >= self.bad_step:
                out = {k: v * float("nan") for k, v in out.items()}
        return out


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build = train_module.build_detector
    monkeypatch.setattr(
        train_module, "build_detector", lambda *a, **k: NaNAfter(build(*a, **k), bad_step=3)
    )
    with pytest.raises(
        NonFiniteLossError, match=r"non-finite loss at step 3 .*loss_classifier=nan"
    ):
        train(tiny(tmp_path, train__epochs=2, train__checkpoint_every=1))
    state = checkpoint.load(tmp_path / "run" / "checkpoint.pt")
    assert state["position"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (tmp_path / "run" / "results.json").exists()


def test_learning_rate_schedule() -> None:
    config = load_config(
        None, {"train.lr": 0.02, "train.warmup_steps": 10, "train.warmup_factor": 0.1,
               "train.decay_at": [0.5, 0.75], "train.gamma": 0.1}
    )  # fmt: skip
    factors = [lr_factor(step, config, 100) for step in (0, 5, 10, 49, 50, 74, 75, 99)]
    assert factors == pytest.approx([0.1, 0.55, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01])


def test_pennfudan_layout_split(tmp_path: Path) -> None:
    """A folder with PNGImages/ and annotations.json: the last 50 images by file name validate."""
    write_coco(SceneDataset(53, seed=0, image_size=32), tmp_path)
    (tmp_path / "images").rename(tmp_path / "PNGImages")
    config = load_config(None, {"data.kind": "coco", "data.root": str(tmp_path)})
    train_set, val_set, categories = build_datasets(config)
    assert (len(train_set), len(val_set)) == (3, 50)
    assert categories == SceneDataset(1, seed=0).categories
    names = {
        i["id"]: i["file_name"]
        for i in json.loads((tmp_path / "annotations.json").read_text())["images"]
    }
    train_names = [names[target["image_id"]] for _, target in train_set]
    val_names = [names[target["image_id"]] for _, target in val_set]
    assert max(train_names) < min(val_names)


def test_roi_loss_every_epoch_and_detections_of_the_final_evaluation(tmp_path: Path) -> None:
    """Three epochs, one evaluation at the end: the mean loss over all RoIs has a point per
    epoch, and the final evaluation's detections are kept for the error breakdown."""
    config = tiny(tmp_path, train__epochs=3, train__eval_every=3)
    train(config)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["epoch"] for r in rows if "roi_loss" in r] == [1, 2, 3]
    assert [r["epoch"] for r in rows if "eval" in r] == [3]
    detections = json.loads((tmp_path / "run" / "detections.json").read_text())
    assert all({"image_id", "category_id", "bbox", "score"} == d.keys() for d in detections)
    assert {d["image_id"] for d in detections} <= {1, 2}
