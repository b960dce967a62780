"""Comparisons spread over processes: the slots, the process runner, and ``--jobs 2`` giving the
report that one job gives."""

from __future__ import annotations

import contextlib
import logging
import operator
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from hardmine.config import config_from_dict
from hardmine.engine.build import RUN_REGISTRIES
from hardmine.report.compare import format_table, run_comparison, summarize
from hardmine.report.jobs import LOG_NAME, Slot, make_slots, run_jobs
from hardmine.report.methods import parse_methods


def test_slots_divide_the_cores_or_take_one_device_each() -> None:
    assert make_slots(1, cpus=8) == [Slot(8)]
    assert make_slots(3, cpus=8) == [Slot(2)] * 3
    assert make_slots(4, cpus=2) == [Slot(1)] * 4  # never fewer than one thread
    assert make_slots(None, ["0", "1"], cpus=16) == [Slot(8, "0"), Slot(8, "1")]
    assert make_slots(2, ["3", "3"], cpus=4) == [Slot(2, "3"), Slot(2, "3")]
    with pytest.raises(ValueError, match="--jobs must be 2"):
        make_slots(3, ["0", "1"])
    with pytest.raises(ValueError, match="at least 1"):
        make_slots(0)


def test_processes_report_success_failure_and_death(tmp_path) -> None:
    tasks = [
        ("fine", time.sleep, (0.1,), tmp_path / "a"),
        ("raises", operator.truediv, (1, 0), tmp_path / "b"),
        ("dies", os._exit, (3,), tmp_path / "c"),
    ]
    results = {r.key: r for r in run_jobs(tasks, make_slots(2, cpus=2))}
    assert results["fine"].error is None
    assert results["raises"].error == "ZeroDivisionError: division by zero"
    assert "Traceback" in results["raises"].traceback
    assert "ZeroDivisionError" in (tmp_path / "b" / LOG_NAME).read_text()
    assert results["dies"].error == ("ChildProcessError: the training process died (exit status 3)")


def test_a_killed_process_is_named_by_its_signal(tmp_path) -> None:
    """S16: it read ``exit status -9``."""
    import signal

    tasks = [("killed", signal.raise_signal, (signal.SIGKILL,), tmp_path / "a")]
    [result] = run_jobs(tasks, make_slots(1, cpus=1))
    assert result.error == (
        "ChildProcessError: the training process died (killed by signal 9 (SIGKILL))"
    )


@pytest.mark.slow
def test_jobs_train_with_dataloader_workers(tmp_path) -> None:
    """S16: the processes were daemonic, and a daemonic process may not start the DataLoader's
    workers: every run failed with ``data.num_workers >= 1``."""
    base = _base(tmp_path, num_workers=1)
    methods = parse_methods("random:sampler.num=32,ohem:sampler.num=32")
    outcomes = run_comparison(base, methods, [0], tmp_path / "cmp", slots=make_slots(2, cpus=2))
    assert [o.error for o in outcomes] == [None, None]
    assert all(o.metrics for o in outcomes)


def _compare_until_training(out: Path, *extra: str):
    """A ``compare --jobs 2`` in a session of its own, once both its runs have taken a step."""
    import subprocess
    import sys

    src = str(Path(__file__).resolve().parents[2] / "src")
    argv = [sys.executable, "-m", "hardmine.cli", "compare", "--methods", "random,ohem"]
    argv += ["--seeds", "1", "--epochs", "1000", "--data.num_train", "4", "--data.num_val", "2"]
    argv += ["--data.image_size", "64", "--model.min_size", "64", "--model.max_size", "64"]
    argv += ["--device", "cpu", "--jobs", "2", "--output", str(out), *extra]
    env = {k: v for k, v in os.environ.items() if k != "HARDMINE_DEBUG"} | {"PYTHONPATH": src}
    # SIGINT back to its default in the child: a shell's background job (``cmd &``) ignores it,
    # and Python then installs no KeyboardInterrupt, so the Ctrl-C below would stop nothing and
    # the test would wait for ever (seen when the suite ran as such a job).
    process = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    metrics = [out / m / "seed0" / "metrics.jsonl" for m in ("random", "ohem")]
    deadline = time.monotonic() + 180
    while not all(m.exists() and m.stat().st_size for m in metrics):
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.2)
    return process


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "sigkill"])
def test_a_stopped_comparison_leaves_no_process_and_no_semaphore(tmp_path, how) -> None:
    """S16: after Ctrl-C (SIGINT to the terminal's process group) or a SIGKILL of the parent, the
    resource tracker warned of ``2 leaked semaphore objects`` (the killed processes' ``tqdm``
    locks); stderr's last line must be the comparison's own."""
    import signal

    process = _compare_until_training(tmp_path / "cmp", "--data.num_workers", "1")
    try:
        if how == "ctrl-c":
            os.killpg(process.pid, signal.SIGINT)
        else:
            os.kill(process.pid, signal.SIGKILL)
        # stderr ends when every process holding it (the parent, the resource tracker) has ended.
        err = process.stderr.read()
        process.wait(timeout=60)
        # No process of the session is left: the runs' (which write to their train.log, not to
        # stderr) stop themselves within a second or two.
        deadline = time.monotonic() + 60
        left = True
        while left and time.monotonic() < deadline:
            try:
                os.killpg(process.pid, 0)
                time.sleep(0.2)
            except ProcessLookupError:
                left = False
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert not left, "a process of the comparison outlived it"
    assert "leaked" not in err and "Traceback" not in err, err
    if how == "ctrl-c":
        assert process.returncode == 130
        assert err.splitlines()[-1] == "hardmine compare: interrupted", err


def _base(tmp_path: Path, **data):
    return config_from_dict(
        {
            "data": {"num_train": 4, "num_val": 2, "image_size": 64, "batch_size": 2} | data,
            "train": {"epochs": 1, "warmup_steps": 1, "log_every": 1, "roi_loss_images": 0},
            "device": "cpu",
            "output_dir": str(tmp_path),
        },
        registries=RUN_REGISTRIES,
    )


def _table(methods, outcomes) -> list[str]:
    """The report's table without its last column, the minutes a run took."""
    return [row.rsplit("|", 2)[0] for row in format_table(summarize(methods, outcomes)).split("\n")]


@pytest.mark.slow
def test_two_jobs_give_the_report_of_one(tmp_path, monkeypatch, caplog) -> None:
    # A run that diverges fails in its process as it fails here, recorded the same way.
    methods = parse_methods(
        "random:sampler.num=32,pisa:num=32,random:num=32:train.lr=1e6:train.warmup_steps=0"
    )
    seeds = [0]
    # The same arithmetic in both: one thread here, and two processes of one thread each.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = run_comparison(_base(tmp_path), methods, seeds, tmp_path / "one")
    finally:
        torch.set_num_threads(threads)
    slots = make_slots(2, cpus=2)
    two = run_comparison(_base(tmp_path), methods, seeds, tmp_path / "two", slots=slots)
    assert [(o.method, o.seed) for o in two] == [(o.method, o.seed) for o in one]
    assert [o.metrics for o in two] == [o.metrics for o in one]
    assert [o.error for o in two] == [o.error for o in one]
    assert [o.error is not None for o in two] == [False, False, True]
    assert "non-finite loss at step" in two[2].error
    assert _table(methods, two) == _table(methods, one)
    for o in two:
        assert (o.run_dir / LOG_NAME).exists()
        assert (o.run_dir / "error.txt").exists() == (o.error is not None)

    # A rerun trains nothing that finished: only the failed runs go to a process again.
    started = []
    import hardmine.report.compare as compare

    def spy(tasks, slots):
        started.extend(key for key, *_ in tasks)
        yield from run_jobs(tasks, slots)

    monkeypatch.setattr(compare, "run_jobs", spy)
    caplog.set_level(logging.INFO, logger="hardmine")
    again = run_comparison(_base(tmp_path), methods, seeds, tmp_path / "two", slots=slots)
    assert started == [(methods[2].name, 0)]
    # One run at a time (not 2: there is one run), with its progress and, as it diverged before
    # its first checkpoint, to be trained from the start.
    assert "1 run to train, 1 at a time" in caplog.text and "1 of 1 runs ended" in caplog.text
    assert f"{methods[2].name}, seed 0: to train in" in caplog.text
    assert [o.metrics for o in again] == [o.metrics for o in two]


def test_plan_writes_each_unfinished_runs_configuration(tmp_path, capsys) -> None:
    from hardmine.cli import main
    from hardmine.engine.build import load_run_config

    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "random,pisa", "--seeds", "2", "--output", str(out)]
    argv += ["--epochs", "1", "--data.num_train", "4", "--device", "cpu", "--plan"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    paths = [out / m / f"seed{s}" / "config.yaml" for m in ("random", "pisa") for s in (0, 1)]
    for path in paths:
        assert f"hardmine train --config {path} --resume" in printed
        config = load_run_config(path)
        assert config.output_dir == str(path.parent) and config.train.epochs == 1
    assert load_run_config(paths[2]).sampler.name == "pisa"
    assert "4 runs to train" in printed
    assert main(argv) == 0  # planning again is harmless: the same configurations


def test_jobs_auto_is_one_run_per_core(monkeypatch) -> None:
    from hardmine import cli
    from hardmine.report import jobs
    from hardmine.report.compare import default_compare_base

    base = default_compare_base()
    parser = cli.build_parser()
    args, _ = parser.parse_known_args(["compare", "--jobs", "auto"])
    monkeypatch.setattr(jobs, "available_cpus", lambda: 2)
    assert cli._slots(args, base) == [Slot(1), Slot(1)]
    monkeypatch.setattr(jobs, "available_cpus", lambda: 1)
    assert cli._slots(args, base) is None  # one core: one run at a time, in this process
    args, _ = parser.parse_known_args(["compare", "--jobs", "AUTO"])
    assert cli._slots(args, base) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_devices_without_gpus_is_one_line(tmp_path, capsys) -> None:
    from hardmine.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["compare", "--devices", "0,1", "--output", str(tmp_path)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "has 0 CUDA device(s)" in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit) as stop:
        main(["compare", "--devices", "a,b", "--output", str(tmp_path)])
    assert stop.value.code == 2 and "GPU indices" in capsys.readouterr().err
