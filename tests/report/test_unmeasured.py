"""COCO's -1 ("nothing to measure") is None, shown as absent wherever AP is printed or plotted."""

from __future__ import annotations

import json
from pathlib import Path

from hardmine.cli import _format_metrics
from hardmine.engine.rundir import MetricsLog, read_metrics
from hardmine.mine.run import RoundResult, format_rounds
from hardmine.report.compare import Method, Outcome, format_table, summarize, write_report

RCNN = {"name": "faster_rcnn_tiny"}
METHODS = (
    Method("random", RCNN, {"name": "random"}),
    Method("ohem", RCNN, {"name": "ohem"}, baseline="random"),
)


def test_cli_prints_n_a() -> None:
    line = _format_metrics({"AP": 0.5, "APs": None, "APl": None})
    assert line == "AP 50.0  APs n/a  APl n/a" and "-100" not in line


def test_compare_leaves_unmeasured_values_out_of_means_and_tables(tmp_path: Path) -> None:
    def outcome(method: str, seed: int, ap75: float | None) -> Outcome:
        run_dir = tmp_path / method / f"seed{seed}"
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_text("")
        metrics = {"AP": 0.1 + seed / 10, "AP50": 0.3, "AP75": ap75}
        return Outcome(method, seed, run_dir, metrics=metrics, seconds=60.0)

    outcomes = [outcome("random", 0, None), outcome("random", 1, 0.2), outcome("ohem", 0, None)]
    random, ohem = summarize(METHODS, outcomes)
    ap75 = random.ap["AP75"]  # the one seed that measured it
    assert (ap75.mean, ap75.std, ap75.n) == (0.2, 0.0, 1)
    assert "AP75" not in ohem.ap and "AP75" not in ohem.delta
    assert (ohem.delta["AP"].mean, ohem.delta["AP"].n) == (0.0, 1)
    table = format_table([random, ohem])
    row = "| ohem | faster_rcnn_tiny | ohem | — | 10.0 | 30.0 | — | random | +0.0 | +0.0 | one seed"
    assert row in table  # AP75 absent, not -100
    report = write_report(tmp_path, METHODS, outcomes, description="A test.").read_text()
    assert "-100" not in report and (tmp_path / "ap.png").exists()


def test_bootstrap_rounds_print_n_a() -> None:
    table = format_rounds([RoundResult(0, "r0", 0, None, 0.25, 1.5, 3)], recall=0.5)
    assert "| 0 | 0 | n/a | 25.0 | 1.50 | 3 |" in table


def test_metrics_log_writes_null_and_skips_it_in_tensorboard(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path, resume_step=None)
    log.write({"step": 1, "epoch": 1, "eval": {"AP": 0.5, "APl": None}})
    log.close()
    text = (tmp_path / "metrics.jsonl").read_text()
    assert '"APl": null' in text and "NaN" not in text
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["eval"]["APl"] is None
    json.loads(text)  # valid JSON
