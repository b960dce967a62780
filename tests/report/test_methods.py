"""``--methods``: names, the papers' presets and variants named by their settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hardmine.config import ConfigError
from hardmine.report.compare import (
    DEFAULT_METHODS,
    default_compare_base,
    format_table,
    run_comparison,
    summarize,
)
from hardmine.report.methods import (
    PRESETS,
    check_method,
    known_methods,
    parse_method,
    parse_methods,
    split_specs,
)


def _config(spec: str, **overrides):
    return check_method(parse_method(spec), default_compare_base(), overrides=overrides)


def test_the_issues_list_of_variants():
    text = "random,ohem,overlap,overlap:strategy=hard,overlap:pos_strategy=soft:epsilon=2"
    methods = parse_methods(text)
    assert [m.name for m in methods] == text.split(",")
    by_name = {m.name: m for m in methods}
    assert by_name["random"] is known_methods()["random"]
    hard = by_name["overlap:strategy=hard"]
    assert hard.baseline == "random"  # the base method's baseline: paired with it by seed
    config = check_method(hard, default_compare_base())
    assert config.sampler.name == "overlap"
    assert config.sampler.settings == {"num": 128, "strategy": "hard"}
    config = check_method(by_name["overlap:pos_strategy=soft:epsilon=2"], default_compare_base())
    assert config.sampler.settings == {"num": 128, "pos_strategy": "soft", "epsilon": 2}


def test_a_variant_of_a_baseline_is_paired_with_it():
    m = parse_method("random:pos_fraction=null")
    assert m.baseline == "random" and m.overrides == {"sampler.pos_fraction": None}
    assert _config("random:pos_fraction=null").sampler.settings["pos_fraction"] is None
    atss = parse_method("retinanet_atss:topk=7")
    assert atss.baseline == "retinanet_max_iou"
    assert _config("retinanet_atss:topk=7").assigner.settings == {"topk": 7}


def test_a_variant_trains_its_baselines_schedule():
    """A variant of a RetinaNet row trains twice the base epochs, as the row it is paired with
    (it once trained the base's 3 against its baseline's 6, a silently unfair pairing)."""
    base_epochs = default_compare_base().train.epochs
    for spec in ("retinanet_max_iou:train.lr=0.01", "retinanet_atss:topk=7"):
        assert parse_method(spec).epochs_scale == 2
        assert _config(spec).train.epochs == 2 * base_epochs
    assert _config("retinanet_atss:topk=7").train.lr == default_compare_base().train.lr
    assert _config("retinanet_atss:topk=7").train.grad_clip == 1.0  # its baseline's clip
    assert _config("retinanet_atss:train.grad_clip=2").train.grad_clip == 2
    assert _config("ohem:num=64").train.grad_clip is None
    assert _config("retinanet_atss:train.lr=0.03").train.lr == 0.03
    assert _config("retinanet_atss:train.epochs=5").train.epochs == 5  # said outright: as said
    assert _config("ohem:num=64").train.epochs == base_epochs


def test_dotted_keys_reach_any_section_and_win_over_the_comparisons_overrides():
    config = _config(
        "overlap:model.box_nms_thresh=0.45:train.lr=0.01:num=64", **{"sampler.num": 256}
    )
    assert config.model.settings == {"box_nms_thresh": 0.45}
    assert config.train.lr == 0.01
    assert config.sampler.settings["num"] == 64  # the variant's own setting is the last word
    assert _config("overlap", **{"sampler.num": 256}).sampler.settings["num"] == 256


def test_variants_may_set_the_schedule_and_the_detector_settings():
    """The keys ``VARIANT_KEYS`` allows still work (defect D6 refuses only the others)."""
    config = _config("ohem_paper:data.batch_size=2:train.lr=0.01:model.box_nms_thresh=0.6")
    assert config.data.batch_size == 2 and config.train.lr == 0.01
    assert config.model.settings["box_nms_thresh"] == 0.6
    assert _config("frcn:assigner.pos_thr=0.6").assigner.settings["pos_thr"] == 0.6


def test_bare_keys_go_to_the_component_that_has_them():
    # frcn has a sampler (random) and an assigner (max_iou): num is the sampler's, neg_thr the
    # assigner's.
    config = _config("frcn:num=32:neg_thr=[0.2, 0.5]")
    assert config.sampler.settings["num"] == 32
    assert config.assigner.settings["neg_thr"] == (0.2, 0.5)


def test_lists_in_values_survive_the_comma_split():
    assert split_specs("random, frcn:neg_thr=[0.2, 0.5] ,ohem") == [
        "random",
        "frcn:neg_thr=[0.2, 0.5]",
        "ohem",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("randm", r"unknown method 'randm'.*valid names: .*overlap_best"),
        ("overlap:strategy", r"expected KEY=VALUE"),
        ("overlap:stratgy=hard", r"unknown setting 'stratgy' of overlap; valid: .*strategy"),
        ("retinanet_atss:sampler.num=3", r"retinanet_atss has no sampler"),
        # Defect D6: a variant keeps the detector, the data and the seeds of the comparison.
        ("random:data.kind=coco", r"a variant may not set data\.kind: .*--data\.kind VALUE"),
        ("overlap:model.name=retinanet_tiny", r"a variant may not set model\.name"),
        ("random:data.num_classes=9", r"a variant may not set data\.num_classes"),
        ("random:seed=3", r"unknown setting 'seed'"),
        ("random:data.num_train=8", r"a variant may not set data\.num_train"),
        ("random:output_dir=x", r"unknown setting 'output_dir'"),
        # Defect D18: a key once per variant, however it is spelled.
        (
            "random:sampler.num=1:sampler.num=2",
            r"random:sampler\.num=1:sampler\.num=2: sampler\.num given more than once",
        ),
        ("random:num=1:sampler.num=2", r"sampler\.num given more than once"),
        ("random:sampler.num=1,sampler.num=2", r"unknown method 'sampler\.num=2'"),
        ("overlap,overlap", r"overlap given more than once"),
        ("random,,ohem", r"empty method name"),
        ("frcn:neg_thr=[0.2, 0.5", r"unbalanced brackets"),
    ],
)
def test_bad_specs_are_config_errors(text: str, message: str):
    with pytest.raises(ConfigError, match=message):
        parse_methods(text)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("overlap:strategy=sometimes", r"--methods overlap:strategy=sometimes: .*expected one of"),
        ("overlap:epsilon=-1", r"--methods overlap:epsilon=-1: sampler.epsilon: must be > 0"),
        ("ohem:train.epoch=3", r"unknown key 'train.epoch'"),
    ],
)
def test_bad_values_are_refused_before_training(spec: str, message: str):
    with pytest.raises(ConfigError, match=message):
        _config(spec)


def test_presets_resolve_and_state_the_papers_settings():
    base = default_compare_base()
    names = set(known_methods())
    for m in PRESETS:
        config = check_method(m, base)
        assert m.baseline is None or m.baseline in names
        assert config.model.name == "faster_rcnn_tiny"
    by_name = {m.name: m for m in PRESETS}
    # OHEM, Table 1: 64 RoIs per image (B = 128, N = 2); Fast R-CNN's bg_lo 0.1; no ratio.
    assert check_method(by_name["ohem_paper"], base).sampler.settings == {"num": 64}
    frcn = check_method(by_name["frcn"], base)
    assert frcn.assigner.settings["neg_thr"] == (0.1, 0.5)
    assert frcn.sampler.settings == {"num": 64, "pos_fraction": 0.25}
    assert check_method(by_name["frcn_no_ratio"], base).sampler.settings["pos_fraction"] is None
    # Overlap, Table 2(f)'s last column: soft K = 2 negatives, soft positives, ε = 2, θ = 0.55.
    best = check_method(by_name["overlap_best"], base)
    assert best.model.settings == {"box_nms_thresh": 0.55}
    settings = best.sampler.settings
    assert (settings["strategy"], settings["pos_strategy"], settings["epsilon"]) == (
        "soft",
        "soft",
        2.0,
    )
    assert check_method(by_name["overlap_neg"], base).model.settings == {}  # θ = 0.5
    # PISA: its three parts at their defaults, 128 RoIs as the random baseline.
    assert check_method(by_name["pisa"], base).sampler.settings == {"num": 128}
    assert by_name["pisa"].baseline == "random"


def test_pisa_parts_are_variants():
    """PISA's ablation: each part alone, as a variant of the preset."""
    base = default_compare_base()
    methods = parse_methods("random,pisa:isr_p=false:carl=false,pisa:isr_n=false:carl=false,pisa")
    sampler = check_method(methods[1], base).sampler
    assert sampler.name == "pisa"
    assert sampler.settings == {"num": 128, "isr_p": False, "carl": False}
    assert [m.baseline for m in methods] == [None, "random", "random", "random"]


def test_methods_default_to_the_default_comparison():
    assert parse_methods(None) == list(DEFAULT_METHODS)
    assert parse_methods("") == list(DEFAULT_METHODS)


def test_variant_runs_get_their_own_directories(tmp_path: Path):
    base = default_compare_base()
    m = parse_method("overlap:strategy=hard")
    config = m.config(base, seed=1, output_dir=tmp_path / m.name / "seed1")
    assert config.output_dir.endswith("overlap:strategy=hard/seed1")


def test_variants_are_rows_paired_with_the_baseline_by_seed(tmp_path: Path):
    """Finished runs are read back: each variant is a row of its own, with the difference to its
    base method's baseline, seed by seed."""
    methods = parse_methods("random,overlap:strategy=hard,overlap:strategy=linear")
    for name, ap in (("random", 0.10), ("overlap:strategy=hard", 0.13)):
        for seed, extra in ((0, 0.0), (1, 0.02)):
            done = tmp_path / name / f"seed{seed}"
            done.mkdir(parents=True)
            metrics = {"AP": ap + extra, "AP50": 0.2, "AP75": 0.05}
            (done / "results.json").write_text(
                json.dumps({"metrics": metrics, "steps": 1, "seconds": 1.0})
            )
    outcomes = run_comparison(default_compare_base(), methods[:2], [0, 1], tmp_path)
    assert all(o.error is None for o in outcomes)
    random, hard, linear = summarize(methods, outcomes)
    assert hard.delta["AP"].mean == pytest.approx(0.03, abs=1e-9)  # paired: +0.03 at each seed
    assert hard.delta["AP"].std == pytest.approx(0.0, abs=1e-9)
    assert linear.runs == 0 and linear.method.baseline == "random"
    assert "| overlap:strategy=hard | faster_rcnn_tiny | overlap |" in format_table([random, hard])


def test_table_shows_what_ran_not_the_base_method(tmp_path: Path):
    """D7: a variant's dotted overrides change the table's columns: ``random:sampler.name=ohem``
    trained OHEM, and its row says ohem (from the run's resolved configuration, and from the
    method's own overrides when no run says)."""
    methods = parse_methods("random,random:sampler.name=ohem,retinanet_atss")
    for m in methods[:2]:
        done = tmp_path / m.name / "seed0"
        done.mkdir(parents=True)
        metrics = {"AP": 0.1, "AP50": 0.2, "AP75": 0.05}
        (done / "results.json").write_text(
            json.dumps({"metrics": metrics, "steps": 1, "seconds": 1.0})
        )
    outcomes = run_comparison(default_compare_base(), methods[:2], [0], tmp_path)
    assert outcomes[1].components == {
        "model": "faster_rcnn_tiny",
        "sampler": "ohem",
        "assigner": "—",
    }
    table = format_table(summarize(methods, outcomes))
    assert "| random | faster_rcnn_tiny | random | — |" in table
    assert "| random:sampler.name=ohem | faster_rcnn_tiny | ohem | — |" in table
    assert "| retinanet_atss | atss_tiny | — | atss |" in table  # no run: its sections
    # Without outcomes at all, the method's sections and overrides say it.
    table = format_table(summarize(methods, []))
    assert "| random:sampler.name=ohem | faster_rcnn_tiny | ohem | — |" in table


def _base_with(**dotted):
    from hardmine.config import apply_overrides, config_from_dict, config_to_dict
    from hardmine.engine.build import RUN_REGISTRIES

    raw = apply_overrides(config_to_dict(default_compare_base()), dotted)
    return config_from_dict(raw, registries=RUN_REGISTRIES)


def test_presets_keep_the_comparisons_schedule_and_the_papers_is_one_override(tmp_path: Path):
    """D14 / D15: the presets keep the comparison's batch size and learning-rate schedule, so that
    each pairs with a baseline trained the same way (the deviation is documented with the
    papers' quotes); the papers' own settings are one override of the whole comparison, which
    reaches the preset and its baseline alike: OHEM's N = 2 images of B/N = 64 RoIs, the Overlap
    paper's Detectron 1x (decays at 2/3 and 8/9)."""
    known = known_methods()
    plain = default_compare_base()
    for name in ("ohem_paper", "frcn", "overlap_best", "random"):
        config = known[name].config(plain, seed=0, output_dir=tmp_path)
        assert config.data.batch_size == plain.data.batch_size == 4
        assert config.train.decay_at == pytest.approx([8 / 12, 11 / 12])  # MMDetection's 1x
    n2 = _base_with(**{"data.batch_size": 2})
    ohem, frcn = (known[m].config(n2, seed=0, output_dir=tmp_path) for m in ("ohem_paper", "frcn"))
    assert ohem.data.batch_size == frcn.data.batch_size == 2
    assert ohem.sampler.settings["num"] * ohem.data.batch_size == 128  # B = 128 over N = 2
    detectron = _base_with(**{"train.decay_at": [0.666667, 0.888889]})
    for name in ("overlap_best", "overlap_neg", "random"):
        config = known[name].config(detectron, seed=0, output_dir=tmp_path)
        assert config.train.decay_at == pytest.approx([2 / 3, 8 / 9], abs=1e-6)
