"""Run configurations: YAML, dotted overrides, checking, round trips."""

from pathlib import Path

import pytest
import yaml

from hardmine.config import (
    ConfigError,
    RunConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_overrides,
    save_config,
)
from hardmine.report.compare import DEFAULT_METHODS, default_compare_base
from hardmine.sample import SAMPLERS

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults() -> None:
    config = load_config()
    assert config == RunConfig()
    assert config.sampler.name == "random" and config.train.momentum == 0.9


def test_yaml_and_dotted_overrides(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        {"sampler": {"name": "ohem", "num": 64}, "train": {"epochs": 2}, "seed": 3},
    )
    overrides = parse_overrides(["--sampler.num", "256", "--train.epochs=5", "--train.lr", "1e-3"])
    config = load_config(path, overrides)
    assert config.sampler.name == "ohem"
    assert config.sampler.settings == {"num": 256}
    assert config.train.epochs == 5 and config.train.lr == pytest.approx(1e-3)
    assert config.seed == 3
    assert config.data == RunConfig().data  # untouched sections keep their defaults


def test_parse_overrides_reads_yaml_values() -> None:
    parsed = parse_overrides(["--a.b", "3", "--c=null", "--d", "[0.5, 0.9]", "--e", "ohem"])
    assert parsed == {"a.b": 3, "c": None, "d": [0.5, 0.9], "e": "ohem"}
    with pytest.raises(ConfigError, match="no value"):
        parse_overrides(["--train.epochs"])
    with pytest.raises(ConfigError, match="expected an override"):
        parse_overrides(["epochs", "3"])


def test_component_given_as_a_bare_name(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, {"sampler": "iou_balanced"}), {"sampler.num_bins": 4})
    assert config.sampler.name == "iou_balanced"
    assert config.sampler.settings == {"num_bins": 4}


def test_null_component() -> None:
    config = load_config(None, {"sampler": None, "model.name": "retinanet_tiny"})
    assert config.sampler.name is None and config.sampler.settings == {}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"train.epoch": 3}, r"unknown key 'train\.epoch'.*did you mean 'epochs'.*valid keys:.*lr"),
        ({"trian.epochs": 3}, r"unknown key 'trian'.*did you mean 'train'"),
        ({"sampler.nmu": 3}, r"unknown key 'sampler\.nmu'.*valid keys: num, pos_fraction"),
        ({"sampler.name": "hardest"}, r"unknown sampler 'hardest'; valid names: .*ohem"),
        ({"assigner.name": "atss", "assigner.pos_thr": 0.5}, r"valid keys: .*topk"),
        ({"train.epochs": "three"}, r"train\.epochs: expected int, got 'three'"),
        ({"train.lr": True}, r"train\.lr: expected float"),
        ({"sampler.strategy": "sometimes", "sampler.name": "overlap"}, r"expected one of"),
        ({"data.kind": "voc"}, r"data\.kind: expected 'scenes' or 'coco'"),
        ({"sampler.needs_losses": True}, r"unknown key 'sampler\.needs_losses'"),
    ],
)
def test_errors_name_the_key_and_the_valid_ones(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_model_settings_pass_through_to_the_builder() -> None:
    """Detector builders forward ``**kwargs`` to torchvision, so any key is accepted here."""
    config = load_config(None, {"model.min_size": 64, "model.box_detections_per_img": 10})
    assert config.model.settings == {"min_size": 64, "box_detections_per_img": 10}


def test_int_accepted_as_float_and_tuples_kept() -> None:
    config = load_config(
        None, {"train.lr": 1, "assigner.name": "max_iou", "assigner.neg_thr": [0, 0.4]}
    )
    assert isinstance(config.train.lr, float)
    assert config.assigner.settings["neg_thr"] == (0.0, 0.4)


def test_round_trip(tmp_path: Path) -> None:
    config = load_config(
        None,
        {"sampler.name": "overlap", "sampler.epsilon": 1.5, "assigner.name": "max_iou",
         "assigner.neg_thr": [0.0, 0.4], "train.decay_at": [0.5], "output_dir": "x"},
    )  # fmt: skip
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
    assert config_from_dict(config_to_dict(config)) == config


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path: Path) -> None:
    config = load_config(path)
    assert config.model.name is not None


def test_compare_methods_resolve() -> None:
    base = default_compare_base()
    names = {m.name for m in DEFAULT_METHODS}
    for method in DEFAULT_METHODS:
        config = method.config(base, seed=1, output_dir=Path("out"))
        assert config.seed == 1 and config.output_dir == "out"
        assert config.model.name == method.model["name"]
        assert method.baseline is None or method.baseline in names
        if method.sampler is not None:
            assert config.sampler.name in SAMPLERS
        else:
            assert config.sampler.name is None


def test_compare_overrides_apply_where_the_method_has_the_section() -> None:
    base = default_compare_base()
    overrides = {"model.min_size": 64, "sampler.num": 32}
    rcnn, retina = (m for m in DEFAULT_METHODS if m.name in ("ohem", "retinanet_atss"))
    config = rcnn.config(base, seed=0, output_dir=Path("a"), overrides=overrides)
    assert config.model.settings == {"min_size": 64} and config.sampler.settings == {"num": 32}
    config = retina.config(base, seed=0, output_dir=Path("b"), overrides=overrides)
    assert config.model.settings == {"min_size": 64} and config.sampler.name is None


SCENES = Path(__file__).parents[2] / "configs" / "scenes_faster_rcnn.yaml"
ATSS = Path(__file__).parents[2] / "configs" / "scenes_atss.yaml"


def test_another_class_starts_its_section_afresh(caplog: pytest.LogCaptureFixture) -> None:
    """The README's ``--sampler.name ohem`` on a random-sampling config runs the paper's OHEM: the
    config's ``pos_fraction: 0.25`` (an fg:bg ratio OHEM removes) and ``num`` are dropped, and
    said so."""
    dropped: list[str] = []
    with caplog.at_level("WARNING", logger="hardmine"):
        config = load_config(SCENES, {"sampler.name": "ohem"}, dropped=dropped)
    assert config.sampler.name == "ohem" and config.sampler.settings == {}
    assert dropped == ["sampler.num=128", "sampler.pos_fraction=0.25"]
    assert "sampler.pos_fraction=0.25" in caplog.text and "ohem replaces random" in caplog.text


def test_settings_given_with_the_new_name_are_kept_in_any_order() -> None:
    for overrides in (
        {"sampler.name": "ohem", "sampler.num": 64},
        {"sampler.num": 64, "sampler.name": "ohem"},
        {"sampler.num": 64, "sampler": "ohem"},  # the whole section by name, then its key
    ):
        config = load_config(SCENES, overrides)
        assert config.sampler.name == "ohem" and config.sampler.settings == {"num": 64}


def test_settings_given_again_are_not_reported_as_dropped(caplog: pytest.LogCaptureFixture) -> None:
    """Defect D12: ``--sampler.name ohem --sampler.num 64`` on a config with ``num: 128`` keeps
    num (given again), so only ``pos_fraction`` is dropped and said so."""
    dropped: list[str] = []
    with caplog.at_level("WARNING", logger="hardmine"):
        config = load_config(SCENES, {"sampler.name": "ohem", "sampler.num": 64}, dropped=dropped)
    assert config.sampler.settings == {"num": 64}
    assert dropped == ["sampler.pos_fraction=0.25"]
    assert "sampler.num" not in caplog.text and "sampler.pos_fraction=0.25" in caplog.text
    # Everything given again: nothing dropped, nothing said.
    dropped.clear()
    caplog.clear()
    with caplog.at_level("WARNING", logger="hardmine"):
        overrides = {"sampler.name": "ohem", "sampler.num": 64, "sampler.pos_fraction": 0.25}
        load_config(SCENES, overrides, dropped=dropped)
    assert dropped == [] and caplog.text == ""


def test_the_atss_configs_max_iou_override_works() -> None:
    """configs/scenes_atss.yaml's own comment: ATSS's topk no longer reaches max-IoU."""
    dropped: list[str] = []
    overrides = parse_overrides(
        [
            "--assigner.name",
            "max_iou",
            "--assigner.pos_thr",
            "0.5",
            "--assigner.neg_thr",
            "0.4",
            "--assigner.low_quality",
            "true",
        ]
    )
    config = load_config(ATSS, overrides, dropped=dropped)
    assert config.assigner.name == "max_iou"
    assert config.assigner.settings == {"pos_thr": 0.5, "neg_thr": 0.4, "low_quality": True}
    assert dropped == ["assigner.topk=9"]


def test_the_same_name_or_no_settings_drop_nothing(caplog: pytest.LogCaptureFixture) -> None:
    dropped: list[str] = []
    with caplog.at_level("WARNING", logger="hardmine"):
        same = load_config(SCENES, {"sampler.name": "random"}, dropped=dropped)
        # The defaults' random sampler has no settings: nothing to drop, nothing said.
        load_config(None, {"sampler.name": "overlap"}, dropped=dropped)
    assert same.sampler.settings == {"num": 128, "pos_fraction": 0.25}
    assert dropped == [] and caplog.text == ""


def test_a_file_naming_another_class_does_not_inherit_default_settings(tmp_path: Path) -> None:
    path = write(tmp_path, {"sampler": {"num": 64}})  # no name: the default class's settings
    assert load_config(path).sampler == load_config(None, {"sampler.num": 64}).sampler
    assert load_config(path).sampler.name == "random"


def test_null_name_drops_the_settings() -> None:
    config = load_config(ATSS, {"assigner.name": None})
    assert config.assigner.name is None and config.assigner.settings == {}


def test_another_model_drops_the_models_settings() -> None:
    path = Path(__file__).parents[2] / "configs" / "scenes_atss_fcos.yaml"
    dropped: list[str] = []
    config = load_config(path, {"model.name": "fcos_tiny", "assigner": None}, dropped=dropped)
    assert config.model.settings == {} and dropped == [
        "model.anchor_scale=4.0",
        "assigner.topk=9",
    ]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"train.epochs": 0}, "train.epochs: must be at least 1, got 0"),
        ({"train.epochs": -1}, "train.epochs: must be at least 1, got -1"),
        ({"train.lr": 0}, "train.lr: must be positive"),
        ({"train.lr": float("nan")}, "train.lr: must be positive, got nan"),
        ({"train.warmup_factor": 2}, "train.warmup_factor: must be in (0, 1]"),
        ({"train.decay_at": [0.5, 2]}, "train.decay_at: must be fractions in [0, 1]"),
        ({"train.log_every": 0}, "train.log_every: must be at least 1"),
        ({"train.max_steps": 0}, "train.max_steps: must be at least 1 (or null)"),
        ({"train.grad_clip": 0}, "train.grad_clip: must be positive and finite (or null)"),
        ({"train.grad_clip": float("nan")}, "train.grad_clip: must be positive and finite"),
        ({"data.batch_size": 0}, "data.batch_size: must be at least 1"),
        ({"data.num_workers": -1}, "data.num_workers: must be at least 0"),
        ({"data.num_train": 0}, "data.num_train: must be at least 1"),
        ({"data.image_size": 16}, "data.image_size: must be at least 32"),
        ({"seed": -1}, "seed: must be at least 0"),
        ({"hard_negative_share": 1.5}, "hard_negative_share: must be in [0, 1]"),
        ({"device": "cude"}, "device: expected auto, cpu, cuda or cuda:N, got 'cude'"),
        # What the classes (or their functions, run on an empty image) check, by key.
        ({"sampler.num": -5}, "sampler.num: must be >= 1, got -5"),
        ({"sampler": {"name": "ohem", "num": 0}}, "sampler.num: must be >= 1, got 0"),
        ({"sampler.pos_fraction": 2}, "sampler.pos_fraction: must be in [0, 1] or None, got 2.0"),
        ({"sampler": {"name": "ohem", "nms_iou": 5}}, "sampler.nms_iou: must be in [0, 1]"),
        ({"sampler": {"name": "iou_balanced", "num_bins": 0}}, "sampler.num_bins: must be >= 1"),
        ({"sampler": {"name": "iou_balanced", "floor_fraction": 2}}, "sampler.floor_fraction:"),
        ({"sampler": {"name": "overlap", "epsilon": 0}}, "sampler.epsilon: must be > 0"),
        ({"assigner": {"name": "atss", "topk": 0}}, "assigner.topk: must be >= 1"),
        ({"assigner": {"name": "max_iou", "chunk_size": 0}}, "assigner.chunk_size:"),
    ],
)
def test_values_out_of_range_are_refused_when_read(overrides: dict, message: str) -> None:
    """Issue 12: refused where they are read, before any work (``--train.epochs 0`` finished
    without a step; ``--sampler.num -5`` crashed inside the training step)."""
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert message in str(error.value)


def test_errors_name_the_file_that_holds_the_mistake(tmp_path: Path) -> None:
    path = write(tmp_path, {"train": {"epochs": 0}})
    with pytest.raises(ConfigError, match=rf"^{path}: train.epochs: must be at least 1"):
        load_config(path)
    with pytest.raises(ConfigError, match=rf"^{path}: train.epochs"):  # the file's, not -o's
        load_config(path, {"train.lr": 0.01})
    good = write(tmp_path, {"train": {"epochs": 2}})
    with pytest.raises(ConfigError, match=r"^train.lr: must be positive"):  # the override's
        load_config(good, {"train.lr": -1})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train:\n  epochs: 3\n   lr: 0.1\n", "not valid YAML at line 3, column 6"),
        ("[1, 2]\n", "expected a mapping at the top level, got list"),
        ("train: {epochs: [}\n", "not valid YAML"),
    ],
)
def test_bad_yaml_names_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"^{path}: ") as error:
        load_config(path)
    assert message in str(error.value)


def test_missing_config_and_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: no such configuration file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a folder, not a configuration file"):
        load_config(tmp_path)


def test_differences_name_what_changes_a_result(tmp_path: Path) -> None:
    from hardmine.config import MAY_DIFFER, describe_differences, differences

    base = load_config(None, {"sampler.num": 128, "output_dir": "runs/a"})
    # Defaults given explicitly, a relative path resolved, settings that change no result.
    same = load_config(
        None,
        {
            "sampler": {"name": "random", "num": 128, "pos_fraction": 0.25},
            "output_dir": str(Path("runs/b").resolve()),
            "train.log_every": 1,
            "data.num_workers": 3,
        },
    )
    assert differences(base, same) == []
    assert {"output_dir", "train.log_every", "data.num_workers"} <= set(MAY_DIFFER)
    other = load_config(None, {"sampler.name": "ohem", "data.batch_size": 2})
    changes = differences(base, other)
    assert describe_differences(changes) == (
        "data.batch_size: 4 -> 2, sampler.name: 'random' -> 'ohem'"
    )


def test_run_paths_are_saved_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hardmine.config import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    config = load_config(
        None, {"output_dir": "runs/x", "data.kind": "coco", "data.root": "data/pennfudan"}
    )
    absolute = with_absolute_paths(config)
    assert absolute.output_dir == str(tmp_path / "runs" / "x")
    assert absolute.data.root == str(tmp_path / "data" / "pennfudan")
    assert absolute.train == config.train and absolute.sampler == config.sampler
