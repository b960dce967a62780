"""Comparison reports: statistics over seeds, paired differences, failures that do not spread."""

import json
from pathlib import Path
from typing import Any

import pytest

from hardmine.config import save_config
from hardmine.engine.rundir import read_metrics
from hardmine.errors import ConfigError
from hardmine.report import compare as compare_module
from hardmine.report.compare import (
    ERROR_NAME,
    Method,
    Outcome,
    default_compare_base,
    format_table,
    run_comparison,
    summarize,
    write_report,
)

RCNN = {"name": "faster_rcnn_tiny"}
METHODS = (
    Method("random", RCNN, {"name": "random"}),
    Method("ohem", RCNN, {"name": "ohem"}, baseline="random"),
)


def outcome(tmp_path: Path, method: str, seed: int, ap: float, **kwargs: object) -> Outcome:
    run_dir = tmp_path / method / f"seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = [{"step": 1, "loss": 1.0 + seed, "picks": {"positive": 10.0, "negative": 100.0}}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = {"AP": ap, "AP50": 2 * ap, "AP75": ap / 2}
    return Outcome(method, seed, run_dir, metrics=metrics, seconds=60.0, **kwargs)  # type: ignore[arg-type]


def test_mean_std_and_paired_difference(tmp_path: Path) -> None:
    outcomes = [
        outcome(tmp_path, "random", 0, 0.10),
        outcome(tmp_path, "random", 1, 0.20),
        outcome(tmp_path, "ohem", 0, 0.13),
        outcome(tmp_path, "ohem", 1, 0.21),
    ]
    random, ohem = summarize(METHODS, outcomes)
    assert random.runs == 2 and random.failed == 0
    assert random.ap["AP"] == pytest.approx((0.15, 0.0707107), rel=1e-5)
    assert random.delta == {}  # a baseline
    # Per seed +0.03 and +0.01: mean +0.02, std 0.01414.
    assert ohem.delta["AP"] == pytest.approx((0.02, 0.0141421), rel=1e-5)
    assert ohem.picks == (10.0, 100.0) and ohem.minutes == pytest.approx(1.0)
    table = format_table([random, ohem])
    assert "| random | faster_rcnn_tiny | random | — | 15.0 ± 7.1 |" in table
    assert "| +2.0 ± 1.4 |" in table and "| random |" in table


def test_failed_runs_are_counted_not_averaged(tmp_path: Path) -> None:
    outcomes = [
        outcome(tmp_path, "random", 0, 0.10),
        outcome(tmp_path, "ohem", 0, 0.5, error="RuntimeError: boom"),
    ]
    path = write_report(tmp_path, METHODS, outcomes, description="A test.")
    report = path.read_text()
    assert "| ohem | faster_rcnn_tiny | ohem | — | — | — | — |" in report
    assert "0 (1 failed)" in report
    assert "ohem, seed 0: RuntimeError: boom" in report
    assert (tmp_path / "ap.png").exists() and (tmp_path / "losses.png").exists()


def test_a_crashing_method_does_not_stop_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first method crashes in training, the other is read from its finished run."""

    def crash(config: Any, *, resume: bool) -> None:
        raise RuntimeError(f"boom in {config.sampler.name}")

    monkeypatch.setattr(compare_module, "train", crash)
    base = default_compare_base()
    methods = (Method("broken", RCNN, {"name": "ohem"}), METHODS[0])
    done = tmp_path / "random" / "seed0"
    done.mkdir(parents=True)
    results = {"metrics": {"AP": 0.1, "AP50": 0.2, "AP75": 0.05}, "steps": 1, "seconds": 1.0}
    (done / "results.json").write_text(json.dumps(results))
    broken, finished = run_comparison(base, methods, [0], tmp_path)
    assert broken.error is not None and "boom in ohem" in broken.error
    assert "RuntimeError" in (tmp_path / "broken" / "seed0" / ERROR_NAME).read_text()
    assert finished.error is None and finished.metrics["AP"] == 0.1


def test_a_misconfigured_method_is_refused_before_any_run(tmp_path: Path) -> None:
    """Issue 12: a setting is refused where it is read, before any work (it was a failed run,
    recorded after the runs before it had trained)."""
    base = default_compare_base()
    methods = (METHODS[0], Method("broken", RCNN, {"name": "no_such_sampler"}))
    with pytest.raises(ConfigError, match="no_such_sampler"):
        run_comparison(base, methods, [0], tmp_path)
    assert not (tmp_path / "random").exists()  # nothing was trained


def test_an_all_failed_call_keeps_the_earlier_report(tmp_path: Path) -> None:
    good = [outcome(tmp_path, "random", 0, 0.10), outcome(tmp_path, "ohem", 0, 0.2)]
    report = write_report(tmp_path, METHODS, good, description="A test.")
    assert report is not None
    written = (report, tmp_path / "ap.png", tmp_path / "losses.png")
    before = {p.name: p.read_bytes() for p in written}
    failed = [
        outcome(tmp_path, "random", 0, 0.1, error="RunError: x"),
        outcome(tmp_path, "ohem", 0, 0.1, error="RunError: y"),
    ]
    assert write_report(tmp_path, METHODS, failed, description="A test.") is None
    for name, content in before.items():
        assert (tmp_path / name).read_bytes() == content
    # Without an earlier report, the failures are reported.
    assert write_report(tmp_path / "new", METHODS, failed, description="A test.") is not None


def test_a_run_directory_of_another_configuration_is_not_reused(tmp_path: Path) -> None:
    base = default_compare_base()
    method = METHODS[0]
    run_dir = tmp_path / "random" / "seed0"
    run_dir.mkdir(parents=True)
    other = method.config(base, seed=5, output_dir=run_dir)
    save_config(other, run_dir / "config.yaml")
    (result,) = run_comparison(base, [method], [0], tmp_path)
    assert result.error is not None and "another configuration" in result.error
    assert read_metrics(run_dir / "metrics.jsonl") == []  # nothing was trained
