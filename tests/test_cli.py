"""The ``hardmine`` command: help for every subcommand, train / eval / compare on tiny settings."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hardmine.cli import PARSERS, build_parser, main
from hardmine.config import load_config
from hardmine.engine.rundir import load_run

# Four 64-px scenes, two per step, one epoch: each run takes seconds.
TINY = [
    "--model.min_size", "64", "--model.max_size", "64",
    "--data.num_train", "4", "--data.num_val", "2", "--data.image_size", "64",
    "--data.batch_size", "2", "--train.epochs", "1", "--train.warmup_steps", "1",
    "--train.log_every", "1", "--device", "cpu",
]  # fmt: skip


ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}


def test_entry_point_help() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "hardmine.cli", "--help"], capture_output=True, text=True, env=ENV
    )
    assert done.returncode == 0
    for command in COMMANDS:
        assert command in done.stdout


COMMANDS = list(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]


@pytest.mark.parametrize("command", COMMANDS)
def test_subcommand_help_explains_each_option(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    parser = build_parser()
    subparser = parser._subparsers._group_actions[0].choices[command]  # type: ignore[union-attr]
    for action in subparser._actions:
        assert action.help, f"{command} {action.option_strings} has no help"
        for option in action.option_strings:
            assert option in text
    if command in ("train", "compare"):
        assert "--section.key VALUE" in text


def test_every_parser_registers_a_command() -> None:
    assert len(PARSERS) == len(COMMANDS)
    assert {"train", "eval", "compare"} <= set(COMMANDS)


def test_unknown_key_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--train.epoch", "3"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "unknown key 'train.epoch'" in err and "did you mean 'epochs'" in err


def test_eval_takes_no_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--run", "x", "--train.epochs", "3"])
    assert exit_.value.code == 2
    assert "unrecognised arguments" in capsys.readouterr().err


def test_train_then_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    argv = ["train", *TINY, "--sampler.num", "32", "--output_dir", str(run)]
    assert main(argv) == 0
    assert "AP" in capsys.readouterr().out
    assert (run / "checkpoint.pt").exists() and (run / "results.json").exists()
    with pytest.raises(SystemExit) as exit_:  # the run exists: --resume or another output_dir
        main(argv)
    assert exit_.value.code == 2  # a user's mistake (issue 12; it was 1)
    assert "--resume" in capsys.readouterr().err
    rows = (run / "metrics.jsonl").read_text()
    assert main([*argv, "--resume"]) == 0  # finished already: nothing more to train
    assert "finished before" in capsys.readouterr().out
    assert (run / "metrics.jsonl").read_text() == rows  # and no second evaluation row
    assert main(["eval", "--run", str(run), "--device", "cpu"]) == 0
    assert f"{run}: AP" in capsys.readouterr().out
    # Inference overrides without retraining (the Overlap paper's Table 2(c) sweep of θ).
    argv = ["eval", "--run", str(run), "--device", "cpu", "--model.box_nms_thresh", "0.3"]
    assert main(argv) == 0
    result = json.loads((run / "eval_model.box_nms_thresh=0.3.json").read_text())
    assert result["overrides"] == {"model.box_nms_thresh": 0.3} and "AP" in result["metrics"]
    assert "overrides" not in json.loads((run / "eval.json").read_text())
    assert load_run(run, overrides={"model.box_nms_thresh": 0.3}).model.roi_heads.nms_thresh == 0.3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "--run", "x", "--model.name", "fcos_tiny"], "--model.name"),
        (["eval", "--run", "x", "--sampler.num", "3"], "inference overrides only"),
        (["compare", "--methods", "overlap:stratgy=hard"], "unknown setting 'stratgy'"),
        (["compare", "--methods", "overlap:epsilon=0"], "epsilon: must be > 0"),
        (["compare", "--methods", "random,nope"], "unknown method 'nope'"),
    ],
)
def test_user_errors_are_one_line_and_status_2(argv: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "hardmine.cli", *argv], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_compare_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "compare"
    argv = ["compare", "--methods", "random,ohem", "--seeds", "1", "--output", str(out), *TINY]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    report = (out / "report.md").read_text()
    for text in (printed, report):
        assert "| method |" in text
        assert "| random | faster_rcnn_tiny | random |" in text
        assert "| ohem | faster_rcnn_tiny | ohem |" in text
    assert (out / "ap.png").exists() and (out / "losses.png").exists()
    # The loss over all RoIs beside AP, and the pictures of every sampler's picks.
    for name in ("roi_loss.png", "inspect/overview.png", "inspect/iou_histograms.png"):
        assert (out / name).stat().st_size > 0, name
        assert f"]({name})" in report
    assert "](inspect/iou_histograms.csv)" in report
    run = load_config(out / "ohem" / "seed0" / "config.yaml")  # the overrides reached the runs
    assert run.model.settings["min_size"] == 64 and run.data.num_train == 4
    checkpoint = out / "ohem" / "seed0" / "checkpoint.pt"
    before = checkpoint.stat().st_mtime_ns
    assert main(argv) == 0  # rerun: finished runs are read, not trained again
    assert checkpoint.stat().st_mtime_ns == before


def test_another_sampler_on_the_command_line_says_what_it_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's ``--sampler.name ohem`` on the random-sampling config: the config's num and
    pos_fraction are dropped, and a line says so once the command works; a command that stops at a
    user's mistake prints that one line only (the note is held back)."""
    config = Path(__file__).parents[1] / "configs" / "scenes_faster_rcnn.yaml"
    argv = ["train", "--config", str(config), *TINY, "--sampler.name", "ohem"]
    with caplog.at_level("WARNING", logger="hardmine"), pytest.raises(SystemExit):
        main([*argv, "--train.epoch", "1"])
    assert "dropped" not in caplog.text
    assert capsys.readouterr().err.count("\n") == 1  # "unknown key 'train.epoch'" only
    caplog.clear()
    with caplog.at_level("WARNING", logger="hardmine"):
        run = ["--train.max_steps", "1", "--train.eval_every", "0", "--output_dir", str(tmp_path)]
        assert main([*argv, *run]) == 0
    assert "dropped sampler.num=128, sampler.pos_fraction=0.25" in caplog.text


def test_help_imports_no_torch() -> None:
    """Issue 12: ``hardmine --help`` took 4.3 s, importing torch to build the parser."""
    probe = (
        "import sys\n"
        "from hardmine.cli import build_parser\n"
        "parser = build_parser()\n"
        "parser.format_help()\n"
        "for sub in parser._subparsers._group_actions[0].choices.values():\n"
        "    sub.format_help()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=ENV, check=True
    )
    assert done.stdout.strip() == "[]"


def test_names_in_the_help_are_the_registries() -> None:
    """The parser lists names without importing the registries; they must agree."""
    from hardmine import cli
    from hardmine.report.compare import DEFAULT_METHODS
    from hardmine.report.inspect import DEFAULT_MODEL
    from hardmine.report.methods import PRESETS
    from hardmine.sample import SAMPLERS

    assert tuple(SAMPLERS) == cli.SAMPLER_NAMES
    assert tuple(m.name for m in DEFAULT_METHODS) == cli.METHOD_NAMES
    assert tuple(m.name for m in PRESETS) == cli.PRESET_NAMES
    assert cli.INSPECT_MODEL == DEFAULT_MODEL


def test_lazy_package_exports() -> None:
    import hardmine

    assert set(hardmine.__all__) == set(hardmine._EXPORTS)
    for name in hardmine.__all__:
        assert getattr(hardmine, name) is not None
    assert hardmine.sample.SAMPLERS is hardmine.SAMPLERS
    with pytest.raises(AttributeError):
        hardmine.no_such_name  # noqa: B018


def test_resume_from_another_folder_and_after_a_move(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 12: the README's resume line, run from another folder, silently started a new run
    (the run's config.yaml stored a relative output folder)."""
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(home)
    argv = ["train", *TINY, "--sampler.num", "32", "--train.eval_every", "0"]
    assert main([*argv, "--train.max_steps", "1", "--output_dir", "runs/x"]) == 0
    saved = load_config(home / "runs" / "x" / "config.yaml")
    assert Path(saved.output_dir) == home / "runs" / "x"  # absolute
    monkeypatch.chdir(elsewhere)
    config = str(home / "runs" / "x" / "config.yaml")
    # max_steps may differ on resume: it moves the end, not the steps.
    assert main(["train", "--config", config, "--resume", "--train.max_steps", "2"]) == 0
    assert not (elsewhere / "runs").exists()
    assert '"step": 2' in (home / "runs" / "x" / "metrics.jsonl").read_text()
    # A run folder moved elsewhere: its own config.yaml still names it.
    (home / "runs" / "x").rename(elsewhere / "moved")
    assert main(["train", "--config", "moved/config.yaml", "--resume"]) == 0
    assert "moved" in capsys.readouterr().out
    assert not (home / "runs" / "x").exists()


def test_an_error_from_a_data_loader_worker_is_one_line() -> None:
    """A worker's error reaches the main process with the worker's traceback as its message."""
    from torch._utils import ExceptionWrapper

    from hardmine.cli import one_line
    from hardmine.errors import DataError

    try:
        raise DataError("data/x.json: image 3: x.png: truncated")
    except DataError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(DataError) as error:
        wrapped.reraise()
    assert "\n" in str(error.value)
    assert one_line(error.value) == "data/x.json: image 3: x.png: truncated"
    assert one_line(DataError("a\nb")) == "a b"
