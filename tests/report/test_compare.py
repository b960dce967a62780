"""Comparison reports: statistics over seeds, paired differences, failures that do not spread."""

import json
from dataclasses import replace
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
    describe,
    format_table,
    run_comparison,
    summarize,
    write_report,
)
from hardmine.report.jobs import Slot
from hardmine.report.methods import parse_method

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
    assert (random.ap["AP"].mean, random.ap["AP"].std) == pytest.approx((0.15, 0.0707107), rel=1e-5)
    assert random.delta == {} and random.verdict is None  # a baseline
    # Per seed +0.03 and +0.01: mean +0.02, std 0.01414, t(0.975, 1) = 12.706: ± 0.127.
    delta = ohem.delta["AP"]
    assert (delta.mean, delta.std) == pytest.approx((0.02, 0.0141421), rel=1e-5)
    assert (delta.low, delta.high) == pytest.approx((0.02 - 0.12706, 0.02 + 0.12706), abs=1e-4)
    assert ohem.verdict == "no detectable difference"
    assert ohem.picks == (10.0, 100.0) and ohem.minutes == pytest.approx(1.0)
    table = format_table([random, ohem])
    assert "| random | faster_rcnn_tiny | random | — | 15.0 ± 7.1 |" in table
    assert "| random | +2.0 [-10.7, +14.7] | +4.0 [" in table
    assert "| no detectable difference |" in table


def test_verdicts_and_intervals_in_the_report(tmp_path: Path) -> None:
    """Three seeds where OHEM is ahead by 1.0-1.2 points on every one: better, with an interval
    that excludes 0; the report carries the interval, the verdict and how they were computed."""
    outcomes = [outcome(tmp_path, "random", s, ap) for s, ap in enumerate([0.30, 0.34, 0.32])]
    outcomes += [outcome(tmp_path, "ohem", s, ap) for s, ap in enumerate([0.31, 0.352, 0.331])]
    _, ohem = summarize(METHODS, outcomes)
    assert ohem.verdict == "better" and ohem.delta["AP"].low > 0
    report = write_report(tmp_path, METHODS, outcomes, description="A test.").read_text()
    assert "| better |" in report and "+1.1 [+0.9, +1.3]" in report
    assert "95 % t-interval" in report and "paired by seed" in report
    worse = [outcome(tmp_path, "ohem", s, ap) for s, ap in enumerate([0.29, 0.33, 0.31])]
    assert summarize(METHODS, outcomes[:3] + worse)[1].verdict == "worse"


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


def test_description_wording() -> None:
    base = default_compare_base()
    base.train.epochs, base.data.num_classes, base.device = 1, 1, "cpu"
    text = describe(base, [0, 1, 2])
    assert "Schedule: 1 epoch," in text and "1 class)" in text and "1 epochs" not in text
    assert "Seeds: 0, 1, 2." in text
    assert "Device: CPU (" in text and "thread" in text and "auto" not in text
    base.device = "auto"
    assert "chosen by device: auto" in describe(base, [0])
    # Under --jobs the report names each process's threads, not the parent's (a stranger's
    # check found "CPU (2 threads)" for runs that trained on one thread each).
    base.device = "cpu"
    text = describe(base, [0], slots=[Slot(1), Slot(1)])
    assert "Device: CPU (1 thread per run, 2 runs at a time)." in text
    base.device = "auto"
    text = describe(base, [0], slots=[Slot(1), Slot(1)])
    assert "Device: CPU (1 thread per run, 2 runs at a time), chosen by device: auto." in text
    base.train.epochs = 3
    assert "3 epochs (384 steps)" in describe(base, [0], steps_per_epoch=128)


def test_the_default_comparison_has_three_seeds_and_a_warm_up_that_ends_early() -> None:
    import argparse

    from hardmine.cli import compare_parser

    parser = argparse.ArgumentParser()
    compare_parser(parser.add_subparsers())
    assert parser.parse_args(["compare"]).seeds == 3
    base = default_compare_base()
    steps = base.train.epochs * base.data.num_train // base.data.batch_size
    assert base.train.warmup_steps <= steps / 5


def test_a_method_may_train_a_multiple_of_the_base_epochs(tmp_path: Path) -> None:
    base = default_compare_base()
    longer = Method("dense", {"name": "atss_tiny"}, assigner={"name": "atss"}, epochs_scale=2)
    assert longer.config(base, seed=0, output_dir=tmp_path).train.epochs == 2 * base.train.epochs
    assert METHODS[0].config(base, seed=0, output_dir=tmp_path).train.epochs == base.train.epochs
    outcomes = [outcome(tmp_path, "random", 0, 0.1), outcome(tmp_path, "dense", 0, 0.1)]
    report = write_report(tmp_path, [METHODS[0], longer], outcomes, description="A test.")
    assert "dense (2× the epochs)" in report.read_text()
    slower = Method("slow", {"name": "atss_tiny"}, epochs_scale=2, lr_scale=0.5)
    config = slower.config(base, seed=0, output_dir=tmp_path)
    assert (config.train.epochs, config.train.lr) == (2 * base.train.epochs, base.train.lr / 2)
    report = write_report(tmp_path, [METHODS[0], slower], outcomes[:1], description="A test.")
    assert "slow (2× the epochs, 0.5× the learning rate)" in report.read_text()
    clipped = Method("clipped", {"name": "atss_tiny"}, grad_clip=1.0)
    assert clipped.config(base, seed=0, output_dir=tmp_path).train.grad_clip == 1.0
    variant = parse_method("clipped:train.grad_clip=2", {"clipped": clipped})
    unclipped = parse_method("clipped:train.grad_clip=null", {"clipped": clipped})
    rows = [METHODS[0], clipped, variant, unclipped]
    text = write_report(tmp_path, rows, outcomes[:1], description="A test.").read_text()
    assert "clipped (gradients clipped to a 2-norm of 1)" in text
    assert "clipped:train.grad_clip=2 (gradients clipped to a 2-norm of 2)" in text
    assert "clipped:train.grad_clip=null (" not in text  # the base's schedule: unclipped
    assert "random (" not in text
    # A base that clips (--train.grad_clip 5) clips every row at 5: no row is named.
    base.train.grad_clip = 5.0
    assert clipped.config(base, seed=0, output_dir=tmp_path).train.grad_clip == 5.0
    text = write_report(tmp_path, rows[:2], outcomes[:1], description="A test.", base=base)
    assert "another schedule" not in text.read_text()


def test_recording_a_failure_never_raises(tmp_path, caplog) -> None:
    """S16: a run folder that could not be made (a name over 255 bytes) crashed the comparison in
    ``_record_failure`` (OSError: File name too long), after training the others, with no report."""
    from hardmine.report.compare import Outcome, _record_failure

    (tmp_path / "file").write_text("")
    for run_dir in (tmp_path / ("x" * 300) / "seed0", tmp_path / "file" / "seed0"):
        outcome = Outcome("m", 0, run_dir)
        _record_failure(outcome, "OSError: File name too long\nmore", "Traceback ...")
        assert outcome.error == "OSError: File name too long"
    assert "its traceback was not kept" in caplog.text
    outcome = Outcome("m", 1, tmp_path / "m" / "seed1")
    _record_failure(outcome, "RuntimeError: x", "the traceback")
    assert (outcome.run_dir / "error.txt").read_text() == "the traceback"


def test_a_finished_run_without_evaluation_is_a_failure_that_says_what_to_do(
    tmp_path: Path,
) -> None:
    """A run trained by hand with train.eval_every 0 was read as finished and reported as
    "AP n/a" among "0 runs"; it is now a failed run whose error names its folder."""
    done = tmp_path / "random" / "seed0"
    done.mkdir(parents=True)
    (done / "results.json").write_text(json.dumps({"metrics": {}, "steps": 1, "seconds": 1.0}))
    (result,) = run_comparison(default_compare_base(), METHODS[:1], [0], tmp_path)
    assert result.error is not None
    assert f"{done}: this run finished without an evaluation (train.eval_every 0)" in result.error
    assert "delete its folder" in result.error


@pytest.mark.parametrize(
    ("methods", "overrides", "where"),
    [
        (METHODS, {"train.eval_every": 0}, r"^train.eval_every 0"),  # every run: no method named
        ((METHODS[0], parse_method("ohem:train.eval_every=0")), {}, r"^--methods ohem:train"),
    ],
)
def test_a_comparison_without_evaluation_is_refused_before_any_run(
    tmp_path: Path, methods: tuple, overrides: dict, where: str
) -> None:
    base = default_compare_base()
    if overrides:
        base = replace(base, train=replace(base.train, eval_every=overrides["train.eval_every"]))
    with pytest.raises(ConfigError, match=where):
        run_comparison(base, methods, [0], tmp_path / "cmp")
    assert not (tmp_path / "cmp").exists()
