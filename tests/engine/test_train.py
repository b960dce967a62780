"""Training runs: the run directory, seeded determinism, resume equivalence, non-finite losses."""

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import Subset

from hardmine.config import RunConfig, load_config
from hardmine.data import SceneDataset, write_coco
from hardmine.engine import checkpoint
from hardmine.engine import train as train_module
from hardmine.engine.build import build_datasets
from hardmine.engine.evaluate import evaluate_run
from hardmine.engine.roi_loss import mean_loss_all_rois
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
    # The loss over all RoIs of train.roi_loss_images training images, beside each evaluation.
    (row,) = [r for r in rows if "eval" in r]
    assert row["roi_loss"] == pytest.approx(
        mean_loss_all_rois(result.model, build_datasets(tiny(tmp_path))[0], device="cpu"),
        rel=1e-5,
    )


def test_roi_loss_images_sets_how_many_images_the_roi_loss_reads(tmp_path: Path) -> None:
    config = tiny(tmp_path, "one", train__eval_every=1, train__roi_loss_images=1)
    result = train(config)
    (row,) = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "eval" in r]
    first = Subset(build_datasets(config)[0], [0])
    assert row["roi_loss"] == pytest.approx(
        mean_loss_all_rois(result.model, first, device="cpu"), rel=1e-5
    )
    result = train(tiny(tmp_path, "none", train__eval_every=1, train__roi_loss_images=0))
    (row,) = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "eval" in r]
    assert "roi_loss" not in row


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


def test_resume_at_an_epoch_end_logs_its_roi_loss_once(tmp_path: Path) -> None:
    """Killed after the roi_loss row at the end of an epoch without evaluation (found by the
    stranger's check): the resumed run ends that epoch again, and the row is in the log once."""
    config = tiny(tmp_path, train__epochs=2, train__eval_every=2)
    train(config)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    only_roi_loss = [r["step"] for r in rows if set(r) == {"step", "epoch", "roi_loss"}]
    assert only_roi_loss == [2]  # epoch 1's end (2 steps an epoch); epoch 2's is an evaluation
    state = checkpoint.load(tmp_path / "run" / "checkpoint.pt")
    state["position"] = {"epoch": 0, "epoch_step": 2, "step": 2}  # killed early in epoch 2
    checkpoint.save_atomic(state, tmp_path / "run" / "checkpoint.pt")
    (tmp_path / "run" / "results.json").unlink()
    train(config, resume=True)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows if set(r) == {"step", "epoch", "roi_loss"}] == [2]
    assert [r["step"] for r in rows if "eval" in r] == [4]


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


def test_grad_clip_scales_the_step_down_to_the_largest_norm(tmp_path: Path) -> None:
    """``train.grad_clip``: a first step whose gradients are longer than ``c`` moves the weights by
    ``lr * c`` along them instead of ``lr * |g|`` (momentum and weight decay act the same in both
    runs at step 1, so the two runs differ by ``lr * (|g| - c)``); both log the unclipped norm."""
    run = {"train__max_steps": 1, "train__warmup_steps": 0}
    free = train(tiny(tmp_path, "free", **run))
    clip = 0.25
    clipped = train(tiny(tmp_path, "clipped", train__grad_clip=clip, **run))
    norm = losses(free.run_dir)[0]["grad_norm"]
    assert losses(clipped.run_dir)[0]["grad_norm"] == pytest.approx(norm, rel=1e-6)
    assert norm > 4 * clip  # so the clip acts
    a, b = weights(free.model), weights(clipped.model)
    moved = torch.stack([(a[k] - b[k]).double().norm() for k in a if a[k].is_floating_point()])
    assert moved.norm().item() == pytest.approx(0.01 * (norm - clip), rel=1e-3)  # lr 0.01


def test_grad_clip_under_amp_logs_the_unscaled_norm(tmp_path: Path) -> None:
    """Under AMP (bfloat16 autocast on the CPU) the gradients are unscaled before the clip: the
    logged norm is the true one, about the float32 run's, not ``2**16`` times it."""
    run = {"train__max_steps": 1, "train__warmup_steps": 0}
    plain = losses(train(tiny(tmp_path, "plain", **run)).run_dir)[0]["grad_norm"]
    amp = train(tiny(tmp_path, "amp", train__amp=True, train__grad_clip=1.0, **run))
    assert losses(amp.run_dir)[0]["grad_norm"] == pytest.approx(plain, rel=0.2)


def test_learning_rate_schedule() -> None:
    config = load_config(
        None, {"train.lr": 0.02, "train.warmup_steps": 10, "train.warmup_factor": 0.1,
               "train.decay_at": [0.5, 0.75], "train.gamma": 0.1}
    )  # fmt: skip
    factors = [lr_factor(step, config, 100) for step in (0, 5, 10, 49, 50, 74, 75, 99)]
    assert factors == pytest.approx([0.1, 0.55, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01])


def test_default_schedule_is_mmdetections_1x() -> None:
    """12 epochs, decay by 10 after epochs 8 and 11 (MMDetection's 1x; Detectron's 1x decays at
    60k and 80k of 90k steps, which its decay_at gives)."""
    config = load_config(None, {"train.warmup_steps": 0})
    assert config.train.epochs == 12
    steps = 1200  # 100 per epoch
    factors = [lr_factor(s, config, steps) for s in (0, 799, 800, 1099, 1100, 1199)]
    assert factors == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01])
    detectron = load_config(None, {"train.warmup_steps": 0, "train.decay_at": [0.666667, 0.888889]})
    factors = [lr_factor(s, detectron, 90_000) for s in (59_999, 60_000, 79_999, 80_000)]
    assert factors == pytest.approx([1.0, 0.1, 0.1, 0.01])


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


class PoisonAfter(nn.Module):
    """A detector whose weights turn NaN in its ``bad_step``-th training forward: what a diverged
    run's next step sees (every value downstream non-finite, inside the samplers too)."""

    def __init__(self, model: nn.Module, bad_step: int) -> None:
        super().__init__()
        self.model, self.bad_step, self.calls = model, bad_step, 0

    def forward(self, images: list[Tensor], targets: Any = None) -> Any:
        if self.training:
            self.calls += 1
            if self.calls == self.bad_step:
                with torch.no_grad():
                    for p in self.model.backbone.parameters():
                        p.fill_(float("nan"))
        return self.model(images, targets)


@pytest.mark.parametrize("sampler", ["random", "ohem", "iou_balanced", "overlap"])
def test_a_diverged_model_stops_in_one_line_for_every_sampler(
    sampler: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 12: OHEM raised ``ValueError: losses: contains NaN`` from inside the step; the
    message claimed a checkpoint where none was written."""
    build = train_module.build_detector
    monkeypatch.setattr(
        train_module, "build_detector", lambda *a, **k: PoisonAfter(build(*a, **k), bad_step=3)
    )
    config = tiny(tmp_path, sampler={"name": sampler, "num": 32}, train__epochs=2)
    with pytest.raises(NonFiniteLossError, match=r"^non-finite loss at step 3 \(epoch 2\)") as e:
        train(config)
    assert "the last checkpoint (step 2)" in str(e.value)  # the end of epoch 1
    assert "\n" not in str(e.value)
    state = checkpoint.load(tmp_path / "run" / "checkpoint.pt")
    assert state["position"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_no_checkpoint_is_claimed_before_the_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build = train_module.build_detector
    monkeypatch.setattr(
        train_module, "build_detector", lambda *a, **k: NaNAfter(build(*a, **k), bad_step=2)
    )
    with pytest.raises(NonFiniteLossError, match=r"step 2 .*no checkpoint was written") as e:
        train(tiny(tmp_path))
    assert "last checkpoint" not in str(e.value)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


class InfiniteGradient(nn.Module):
    """A finite loss term (sqrt(0) = 0) whose gradient is not finite (0 / 0), from the
    ``bad_step``-th training forward on: the step would write non-finite weights."""

    def __init__(self, model: nn.Module, bad_step: int) -> None:
        super().__init__()
        self.model, self.bad_step, self.calls = model, bad_step, 0

    def forward(self, images: list[Tensor], targets: Any = None) -> Any:
        out = self.model(images, targets)
        if self.training:
            self.calls += 1
            if self.calls >= self.bad_step:
                w = next(self.model.parameters())
                out = out | {"sqrt0": torch.sqrt((w - w.detach()).pow(2).sum())}
        return out


def test_a_non_finite_gradient_stops_before_the_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build = train_module.build_detector
    monkeypatch.setattr(
        train_module,
        "build_detector",
        lambda *a, **k: InfiniteGradient(build(*a, **k), bad_step=2),
    )
    with pytest.raises(NonFiniteLossError, match=r"step 2 .*but its gradient is not finite"):
        train(tiny(tmp_path, train__checkpoint_every=1))
    state = checkpoint.load(tmp_path / "run" / "checkpoint.pt")
    assert state["position"]["step"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_an_empty_training_set_is_refused(tmp_path: Path) -> None:
    from hardmine.errors import DataError

    (tmp_path / "images").mkdir()
    empty = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}
    (tmp_path / "ann.json").write_text(json.dumps(empty))
    coco = {
        "data.kind": "coco",
        "data.train_images": str(tmp_path / "images"),
        "data.train_ann": str(tmp_path / "ann.json"),
        "data.val_images": str(tmp_path / "images"),
        "data.val_ann": str(tmp_path / "ann.json"),
    }
    with pytest.raises(DataError, match=r"ann.json\) has no images"):
        train(tiny(tmp_path, **{k.replace(".", "__"): v for k, v in coco.items()}))
    assert not (tmp_path / "run").exists()


def test_a_run_read_back_on_data_of_other_categories_is_refused(tmp_path: Path) -> None:
    """Issue 12: ``mine --data`` with other categories gave a state-dict size mismatch."""
    from hardmine.engine.rundir import load_run
    from hardmine.errors import CheckpointError, RunError

    train(tiny(tmp_path, train__max_steps=1))
    write_coco(SceneDataset(2, seed=3, image_size=64, num_classes=1), tmp_path / "one")
    one = [str(tmp_path / "one" / "images"), str(tmp_path / "one" / "annotations.json")]
    other = {"data.kind": "coco"} | {
        f"data.{k}": v
        for k, v in zip(
            ("train_images", "train_ann", "val_images", "val_ann"), one * 2, strict=True
        )
    }
    with pytest.raises(
        RunError, match=r"trained on the categories \['ring', 'cross', 'triangle'\]"
    ):
        load_run(tmp_path / "run", overrides=other)
    # A checkpoint of an older version, without its categories: the weights do not fit.
    path = tmp_path / "run" / "checkpoint.pt"
    state = checkpoint.load(path)
    del state["categories"]
    checkpoint.save_atomic(state, path)
    with pytest.raises(CheckpointError, match=r"checkpoint.pt: its weights do not fit") as error:
        load_run(tmp_path / "run", overrides=other)
    assert "\n" not in str(error.value)
