"""The methods a comparison can run, by name: the default ones, the papers' presets, and variants.

``hardmine compare --methods`` takes a comma-separated list of *method specs*. A spec is a name,
from ``DEFAULT_METHODS`` or ``PRESETS``, optionally followed by settings,
``NAME:KEY=VALUE[:KEY=VALUE...]``: ``overlap:strategy=hard``, ``overlap_pos:epsilon=2``,
``ohem_paper:data.batch_size=1``. A bare key is a setting of the method's sampler (or, for a method
without one, its assigner; a method with both takes the one whose class has the key); a dotted key
addresses a key of the run configuration that a variant may set (below): ``model.box_nms_thresh``,
``assigner.neg_thr``, ``train.lr``. Values are read as YAML. Each spec is its own method, named by
the spec, trained in its own run directories and paired by seed with its base method's baseline (a
variant of a baseline with that baseline). A key may be given once per spec. A variant may change
only what keeps the pairing fair (``VARIANT_KEYS``): the sampler, the assigner, the detector's
settings (not ``model.name``), the schedule (``train.*``, ``data.batch_size``) and hard negatives;
another detector or other data is refused. A dotted key of a component the method does not have
(``retinanet_atss:sampler.num=3``: RetinaNet takes no sampler) is refused too.

The presets reproduce the structure of the papers' ablations on the tiny detectors of the default
comparison (README, "The papers' ablations"). Budgets are per image. The OHEM presets take the
OHEM paper's 64 RoIs per image (B = 128 over N = 2 images, Shrivastava et al., Sec. 3.1); the
Overlap presets take the default comparison's 128, as its ``random`` baseline does.

Two deviations from the papers' schedules, kept on purpose (a preset is paired by seed with its
baseline, which must train the same way; both readings below cost the same to run), and how to
get the papers' own:

* **Images per step (OHEM).** The paper: "For each mini-batch, N images are first sampled from
  the dataset, and then B/N RoIs are sampled from each image. Setting N = 2 and B = 128 works
  well in practice" (Sec. 3.1), and "Following FRCN [14], we use N = 2 (which results in
  |R| ≈ 4000) and B = 128" (Sec. 4.2). ``ohem_paper`` (and ``frcn``, ``frcn_bg0``,
  ``frcn_no_ratio``) take B/N = 64 RoIs per image but the comparison's batch size (the default
  comparison: 4 images per step, so B = 256 per step). The paper's N = 2, B = 128 is
  ``--data.batch_size 2`` for the whole comparison (the baseline too; README, Table 1).
* **The learning-rate schedule (Overlap Sampler).** The paper follows maskrcnn-benchmark:
  "set the initial learning rate as 2×10−2 in the first 60k iterations, then decay it by [a
  factor of] 10 and 10^2 for training another 20k and 10k iterations, which is called "1×"
  training schedule" (Sec. 4.1): Detectron's 1x, decays at 2/3 and 8/9 of the steps. The
  ``overlap_*`` presets train on the comparison's schedule, by default MMDetection's 1x shape
  (decays at 8/12 and 11/12, ``TrainConfig``), as their ``random`` baseline does. The paper's
  is ``--train.decay_at '[0.666667, 0.888889]'`` for the whole comparison.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hardmine.assign import ASSIGNERS
from hardmine.config import (
    COMPONENT_SECTIONS,
    ConfigError,
    RunConfig,
    read_yaml_value,
    settings_of,
)
from hardmine.engine.build import build_assigner, build_sampler, check_run_config
from hardmine.report.compare import DEFAULT_METHODS, Method
from hardmine.sample import SAMPLERS

_RCNN = {"name": "faster_rcnn_tiny"}
# Fast R-CNN's labels: foreground at IoU >= 0.5, background in [bg_lo, 0.5), with bg_lo = 0.1, and
# without it, bg_lo = 0 (OHEM paper, Sec. 3.1).
_BG_LO = {"name": "max_iou", "pos_thr": 0.5, "neg_thr": [0.1, 0.5]}
_BG_0 = {"name": "max_iou", "pos_thr": 0.5, "neg_thr": 0.5}
_FRCN = {"name": "random", "num": 64, "pos_fraction": 0.25}
# The Overlap paper's inference NMS threshold θ = 0.55 (Table 2(c), Table 2(f)).
_THETA = {"model.box_nms_thresh": 0.55}

PRESETS: tuple[Method, ...] = (
    # OHEM paper, Table 1 (Shrivastava et al., CVPR 2016): Fast R-CNN's sampling (rows 1-2:
    # 25% foreground, bg_lo 0.1), the hard-mining heuristic removed (rows 3-4: bg_lo 0), the
    # fg:bg ratio removed (Sec. 3.1, "randomly sampling RoIs"), and OHEM (rows 11-13).
    Method("frcn", _RCNN, _FRCN, assigner=_BG_LO),
    Method("frcn_bg0", _RCNN, _FRCN, assigner=_BG_0, baseline="frcn"),
    Method("frcn_no_ratio", _RCNN, _FRCN | {"pos_fraction": None}, _BG_LO, baseline="frcn"),
    # B/N = 64 RoIs per image; N = 2 images per step is --data.batch_size 2 for the whole
    # comparison (see the module docstring: the presets keep the comparison's batch size).
    Method("ohem_paper", _RCNN, {"name": "ohem", "num": 64}, _BG_0, baseline="frcn"),
    # Overlap Sampler paper, Table 2 (Chen et al., WACV 2020). Its ablation defaults: soft
    # sampling with K = 2, ε = 1, θ = 0.5. The negative sampler alone (Table 2(a)-(c)), the
    # positive sampler alone (2(d)-(e)), and the three columns of 2(f). The comparison's
    # schedule, not the paper's Detectron 1x (--train.decay_at '[0.666667, 0.888889]' for all).
    Method(
        "overlap_neg",
        _RCNN,
        {"name": "overlap", "num": 128, "pos_strategy": "uniform", "epsilon": 1.0},
        baseline="random",
    ),
    Method(
        "overlap_pos",
        _RCNN,
        {"name": "overlap", "num": 128, "strategy": "uniform", "epsilon": 1.0},
        baseline="random",
    ),
    Method(
        "overlap_neg_best",
        _RCNN,
        {"name": "overlap", "num": 128, "pos_strategy": "uniform", "epsilon": 1.0},
        baseline="random",
        overrides=_THETA,
    ),
    Method(
        "overlap_pos_best",
        _RCNN,
        {"name": "overlap", "num": 128, "strategy": "uniform", "epsilon": 2.0},
        baseline="random",
    ),
    Method(
        "overlap_best",
        _RCNN,
        {"name": "overlap", "num": 128, "strategy": "soft", "pos_strategy": "soft", "epsilon": 2.0},
        baseline="random",
        overrides=_THETA,
    ),
    # PISA (Cao et al., CVPR 2020), which the Overlap Sampler paper compares with (Table 3): its
    # three parts at MMDetection's defaults, on the default comparison's 128 RoIs per image
    # (its parts alone: pisa:isr_p=false:carl=false and so on).
    Method("pisa", _RCNN, {"name": "pisa", "num": 128}, baseline="random"),
)


def known_methods() -> dict[str, Method]:
    """Every method a spec may name: the default comparison's and the presets, by name."""
    return {m.name: m for m in (*DEFAULT_METHODS, *PRESETS)}


def split_specs(text: str) -> list[str]:
    """``--methods`` cut at the commas outside brackets: ``a,b:neg_thr=[0.1, 0.5]`` -> two specs.

    Raises:
        ConfigError: an empty spec or unbalanced brackets.
    """
    specs, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
            if depth < 0:
                raise ConfigError(f"--methods: unbalanced brackets in {text!r}")
        elif char == "," and depth == 0:
            specs.append(text[start:i].strip())
            start = i + 1
    if depth:
        raise ConfigError(f"--methods: unbalanced brackets in {text!r}")
    specs.append(text[start:].strip())
    if not all(specs):
        raise ConfigError(f"--methods: empty method name in {text!r}")
    return specs


def parse_method(spec: str, known: Mapping[str, Method] | None = None) -> Method:
    """The method a spec names: ``NAME`` or ``NAME:KEY=VALUE[:KEY=VALUE...]`` (module docstring).

    Args:
        spec: the spec.
        known: the methods a spec may name; ``known_methods()`` when None.

    Returns:
        ``known[NAME]`` for a bare name; otherwise a method named ``spec`` with the base's
        sections, the settings as dotted ``overrides`` (after the base's own), and the base's
        baseline (the base itself when it is a baseline).

    Raises:
        ConfigError: an unknown name, a setting without ``=``, a bare key that neither the
            method's sampler nor its assigner has, a key of a section the method lacks, a key
            given twice, or a key a variant may not set (``VARIANT_KEYS``).
    """
    known = known_methods() if known is None else known
    name, *pairs = (part.strip() for part in _split_spec(spec))
    if name not in known:
        raise ConfigError(
            f"--methods: unknown method {name!r}; valid names: {', '.join(sorted(known))}"
        )
    base = known[name]
    if not pairs:
        return base
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, eq, text = pair.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"--methods {spec}: expected KEY=VALUE, got {pair!r}")
        dotted = _dotted(key, base, spec)
        _check_fair(dotted, spec)
        if dotted in overrides:  # num=1:sampler.num=2 too: which would win is no one's guess
            raise ConfigError(f"--methods {spec}: {dotted} given more than once")
        overrides[dotted] = read_yaml_value(text.strip(), f"--methods {spec}: {dotted}")
    return Method(
        spec,
        base.model,
        base.sampler,
        base.assigner,
        baseline=base.baseline or base.name,
        epochs_scale=base.epochs_scale,  # paired with its baseline: the same schedule
        lr_scale=base.lr_scale,
        grad_clip=base.grad_clip,
        overrides={**base.overrides, **overrides},
    )


def _split_spec(spec: str) -> list[str]:
    """``spec`` split at its colons outside brackets and quotes: ``random:train.lr={a: 1}`` is
    ``["random", "train.lr={a: 1}"]``, whose value then fails as a value, not as a split."""
    parts, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(spec):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth = max(depth - 1, 0)
        elif char == ":" and depth == 0:
            parts.append(spec[start:i])
            start = i + 1
    return [*parts, spec[start:]]


#: The keys a variant may set (exactly, or a section with every key under it): what is compared
#: (the sampler, the assigner), the detector's settings and the training schedule. Everything
#: else is fixed for all methods of a comparison: another detector (``model.name``), other data
#: (``data.*``: another dataset, split or class count makes the AP of another task) or another
#: seed, device or folder would pair runs by seed that do not measure the same thing; give such a
#: key to every method instead (``hardmine compare --data.num_classes 2``).
VARIANT_KEYS = ("sampler.", "assigner.", "model.", "train.", "data.batch_size", "hard_negatives",
                "hard_negative_share")  # fmt: skip
#: Keys under ``VARIANT_KEYS`` that a variant still may not set.
VARIANT_FIXED = ("model.name",)


def _check_fair(key: str, spec: str) -> None:
    """Raise ``ConfigError`` unless a variant may set ``key`` (``VARIANT_KEYS``)."""
    allowed = any(key == k or (k.endswith(".") and key.startswith(k)) for k in VARIANT_KEYS)
    if not allowed or key in VARIANT_FIXED:
        raise ConfigError(
            f"--methods {spec}: a variant may not set {key}: every method of a comparison has "
            "the same detector, data and seeds (a variant sets sampler.*, assigner.*, model.* but "
            "model.name, train.*, data.batch_size, hard_negatives); give it to every method as "
            f"--{key} VALUE"
        )


def _dotted(key: str, base: Method, spec: str) -> str:
    """``key`` as a dotted configuration key for ``base`` (see the module docstring)."""
    if "." in key:
        section = key.split(".")[0]
        if section in COMPONENT_SECTIONS and getattr(base, section) is None:
            raise ConfigError(
                f"--methods {spec}: {base.name} has no {section}, so it takes no {key}"
            )
        return key
    registries = {"sampler": SAMPLERS, "assigner": ASSIGNERS}
    valid: list[str] = []
    for section in ("sampler", "assigner"):
        component = getattr(base, section)
        if component is None:
            continue
        fields, _ = settings_of(registries[section][component["name"]])
        if key in fields:
            return f"{section}.{key}"
        valid += list(fields)
    if not valid:
        raise ConfigError(f"--methods {spec}: {base.name} has neither sampler nor assigner")
    raise ConfigError(
        f"--methods {spec}: unknown setting {key!r} of {base.name}; valid: "
        f"{', '.join(sorted(valid))} (or a dotted key such as model.box_nms_thresh)"
    )


def parse_methods(text: str | None) -> list[Method]:
    """The methods of ``--methods`` (all of ``DEFAULT_METHODS`` when None or empty).

    Raises:
        ConfigError: a bad spec (``parse_method``), or the same spec twice.
    """
    if not text:
        return list(DEFAULT_METHODS)
    known = known_methods()
    methods = [parse_method(spec, known) for spec in split_specs(text)]
    names = [m.name for m in methods]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"--methods: {', '.join(twice)} given more than once")
    return methods


def check_method(
    method: Method, base: RunConfig, *, overrides: Mapping[str, Any] | None = None
) -> RunConfig:
    """``method``'s configuration on ``base``, its sampler and assigner made once, so that a bad
    variant is refused before any training.

    Raises:
        ConfigError: an unknown key, a value of the wrong type or out of range, naming the
            method.
    """
    try:
        config = method.config(
            base, seed=base.seed, output_dir=Path(base.output_dir), overrides=overrides
        )
        check_run_config(config)
        build_sampler(config)
        build_assigner(config)
    except (ConfigError, ValueError, TypeError) as error:
        raise ConfigError(f"--methods {method.name}: {error}") from None
    return config
