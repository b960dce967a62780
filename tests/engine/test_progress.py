"""Progress without a terminal: lines in the log instead of a bar (issue 12: ``train > log``
printed nothing until the end; eval, mine and inspect showed no progress at all)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from hardmine.config import load_config
from hardmine.engine.build import build_datasets
from hardmine.engine.evaluate import evaluate
from hardmine.engine.progress import progress
from hardmine.engine.train import train


def test_lines_at_every_tenth_and_at_the_end(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="hardmine")
    assert list(progress(range(40), total=40, desc="evaluating")) == list(range(40))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 10  # 4, 8, ..., 36 of 40, then the end
    assert lines[0].startswith("evaluating: 4/40 batches")
    assert lines[-1].startswith("evaluating: 40 batches done in")


def test_training_logs_a_line_per_logged_step(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hardmine")
    config = load_config(
        None,
        {
            "model.min_size": 64,
            "model.max_size": 64,
            "sampler.num": 16,
            "data.num_train": 4,
            "data.num_val": 2,
            "data.image_size": 64,
            "data.batch_size": 2,
            "train.epochs": 2,
            "train.log_every": 2,
            "train.eval_every": 2,
            "device": "cpu",
            "output_dir": str(tmp_path / "run"),
        },
    )
    result = train(config)
    lines = [r.getMessage() for r in caplog.records]
    steps = [line for line in lines if line.startswith("epoch ")]
    assert [line.split("  ")[1] for line in steps] == ["step 2/4", "step 4/4"]
    assert all(" loss " in line and "s/step" in line for line in steps)
    assert any(line.startswith("evaluating: 1 batches done") for line in lines)
    caplog.clear()
    evaluate(result.model, build_datasets(config)[1], device="cpu")
    assert any(r.getMessage().startswith("evaluating:") for r in caplog.records)
