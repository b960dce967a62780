"""Run configurations: dataclasses loaded from YAML, with dotted command-line overrides.

A run configuration names a detector, a sampler and an assigner (each with the keyword settings of
its class), the data, the training schedule, the seed, the device and the output directory::

    model: {name: faster_rcnn_tiny}
    sampler: {name: ohem, num: 128}
    train: {epochs: 3, lr: 0.01}

Overrides address any key by its dotted path: ``--sampler.num 256 --train.epochs 3``. Values are
read as YAML (``3`` is an int, ``null`` is None, ``[0.5, 0.8]`` a list). Names map to classes in
one explicit dict per section; an unknown name or key is an error that lists the valid ones.
Giving a component another class (``--sampler.name ohem``) starts that section afresh from the new
class's defaults, keeping only the settings given in the same overrides; the settings it drops
are logged and reported (``apply_overrides``).

This module is the schema only. It knows the samplers' and assigners' registries (``SAMPLERS``,
``ASSIGNERS``, from the core) and checks their settings against the classes' dataclass fields.
The detectors live a layer up (``hardmine.models``), so the ``model`` section is checked against
``DETECTORS`` where that registry is passed in (``registries=``): by
``hardmine.engine.build.load_run_config``, which every command uses.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import logging
import math
import os
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from hardmine._atomic import write_atomic
from hardmine.assign import ASSIGNERS
from hardmine.errors import ConfigError
from hardmine.sample import SAMPLERS
from hardmine.structures import Assignment, RoIScores

log = logging.getLogger(__name__)


@dataclass
class ComponentConfig:
    """A class chosen by name from a registry, with keyword settings for it.

    In YAML the settings sit beside the name: ``sampler: {name: ohem, num: 128}``.

    Attributes:
        name: key in the section's registry; None leaves the choice to the detector (its own
            assigner, torchvision's sampler).
        settings: keyword arguments for the class; checked against its signature.
    """

    name: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Where images come from and how they are batched.

    Attributes:
        kind: ``"scenes"`` (the built-in generated scenes) or ``"coco"`` (COCO-format files).
        root: for ``"coco"``: a folder in a known layout instead of the four paths (the shared
            PennFudan folder, ``PNGImages/`` + ``annotations.json``, split as torchvision's
            tutorial does: the last 50 images by file name are validation).
        train_images: folder of the training images (``file_name`` is relative to it).
        train_ann: COCO "instances" JSON of the training images.
        val_images: folder of the validation images.
        val_ann: COCO JSON of the validation images.
        num_train: generated training scenes.
        num_val: generated validation scenes.
        image_size: side of the generated scenes in pixels.
        num_classes: object classes in the generated scenes.
        batch_size: images per step in each process.
        num_workers: data loading processes per training process.
        on_bad_box: for ``"coco"``: a box with no area or reaching more than ``box_tolerance``
            pixels outside its image is an error (``"error"``), or is dropped with a warning
            that counts them (``"skip"``).
        box_tolerance: for ``"coco"``: how far, in pixels, a box may reach outside its image and
            still be clipped to it rather than be a bad box.
        check_images: for ``"coco"``: decode every image file in full before training starts
            (in threads; unchanged files are remembered under ``~/.cache/hardmine``), so that a
            truncated or undecodable file is named at once; False finds it when it is read.
    """

    kind: str = "scenes"
    root: str | None = None
    train_images: str | None = None
    train_ann: str | None = None
    val_images: str | None = None
    val_ann: str | None = None
    num_train: int = 128
    num_val: int = 32
    image_size: int = 128
    num_classes: int = 3
    batch_size: int = 4
    num_workers: int = 0
    on_bad_box: Literal["error", "skip"] = "error"
    box_tolerance: float = 1.0
    check_images: bool = True


@dataclass
class TrainConfig:
    """The optimisation schedule: SGD with linear warm-up and step decay.

    Defaults are MMDetection's 1x schedule: 12 epochs, momentum 0.9, weight decay 1e-4, lr 0.02
    for 16 images per step, decay by 10 after epochs 8 and 11 (``decay_at`` 8/12 and 11/12).
    Detectron's 1x, which maskrcnn-benchmark and the Overlap Sampler paper use (Sec. 4.1: 60k
    iterations at 0.02, then 20k at a tenth of it and 10k at a hundredth, "which is called '1x'
    training schedule"), decays at 60k and 80k of 90k steps: ``decay_at: [0.666667, 0.888889]``.

    Attributes:
        epochs: passes over the training set.
        lr: base learning rate (the standard 0.02 is for 16 images per step; scale linearly).
        momentum: SGD momentum.
        weight_decay: L2 penalty on the weights.
        warmup_steps: steps of linear warm-up from ``warmup_factor * lr`` to ``lr``.
        warmup_factor: the learning rate at step 0 as a fraction of ``lr``.
        decay_at: fractions of the schedule's steps at which the learning rate is multiplied by
            ``gamma``; fractions so that the schedule scales with ``epochs`` (MMDetection's 1x:
            8/12 and 11/12; Detectron's 1x: 2/3 and 8/9).
        gamma: the decay factor.
        grad_clip: the largest 2-norm of all gradients together: a step whose gradients are
            longer is scaled down to it (``torch.nn.utils.clip_grad_norm_``; MMDetection's
            ``grad_clip=dict(max_norm=...)``, 35 in its FCOS configurations); None: no clipping.
            Under AMP the gradients are unscaled first. Each log row holds ``grad_norm``, the mean
            norm before clipping over its steps with a finite one (absent under AMP without
            clipping, whose gradients are scaled, and where no step had a finite norm: under AMP
            the scaler skips such steps).
        amp: mixed precision (autocast with gradient scaling: float16 on CUDA, bfloat16 on the
            CPU, torch's defaults); None: on CUDA only.
        max_steps: stop after this many steps in total (the schedule still spans ``epochs``).
        log_every: steps between rows of ``metrics.jsonl``.
        eval_every: epochs between COCO evaluations, and one at the end; 0: never.
        checkpoint_every: steps between checkpoints; 0: at the end of each epoch only.
        roi_loss_images: at each evaluation, the mean loss over all RoIs of this many training
            images (the first ones) is logged, the OHEM paper's sampler-independent measure
            (``hardmine.engine.roi_loss``); 0: not measured.
    """

    epochs: int = 12
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 500
    warmup_factor: float = 0.001
    decay_at: list[float] = field(default_factory=lambda: [8 / 12, 11 / 12])
    gamma: float = 0.1
    grad_clip: float | None = None
    amp: bool | None = None
    max_steps: int | None = None
    log_every: int = 20
    eval_every: int = 1
    checkpoint_every: int = 0
    roi_loss_images: int = 32


@dataclass
class RunConfig:
    """Everything one training run needs.

    Attributes:
        model: the detector, by name in ``hardmine.models.DETECTORS``, with ``build`` settings.
        sampler: the sampler, by name in ``hardmine.sample.SAMPLERS``, with its settings.
        assigner: the assigner, by name in ``ASSIGNERS``, with its settings.
        data: the datasets.
        train: the schedule.
        seed: seeds weights, data order and the samplers' generators (each process its own).
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        output_dir: the run directory.
        hard_negatives: a file of offline-mined hard negatives (``hardmine.mine``) to train
            with: they join the RoI candidates of their images as background. A file mined on
            a folder of images (version 2) goes with that folder as ``negative_images``.
        hard_negative_share: fraction of the negative picks guaranteed to the mined boxes.
        negative_images: a folder of images that hold none of the classes (any image files,
            found recursively): they join the training set as images without objects
            (``hardmine.data.folder``).
        negative_image_share: fraction of each epoch's training images taken from
            ``negative_images``, in ``[0, 1)``: 0.25 adds one folder image for every three of
            the training set.
    """

    model: ComponentConfig = field(default_factory=lambda: ComponentConfig("faster_rcnn_tiny"))
    sampler: ComponentConfig = field(default_factory=lambda: ComponentConfig("random"))
    assigner: ComponentConfig = field(default_factory=ComponentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0
    device: str = "auto"
    output_dir: str = "runs/default"
    hard_negatives: str | None = None
    hard_negative_share: float = 0.25
    negative_images: str | None = None
    negative_image_share: float = 0.25


Registries = Mapping[str, Mapping[str, Callable[..., Any]]]
#: The component sections of a run configuration: each a name plus that class's settings.
COMPONENT_SECTIONS = ("model", "sampler", "assigner")
#: The registries this layer knows; a section without one (``model``) takes any name and settings.
REGISTRIES: Registries = {"sampler": SAMPLERS, "assigner": ASSIGNERS}


def settings_of(target: Callable[..., Any]) -> tuple[dict[str, Any], bool]:
    """The keyword settings a class or builder accepts, with their type hints (Any if none).

    A sampler's or assigner's settings are its dataclass fields (``needs_losses`` is a
    ``ClassVar``, not a field); a detector builder's are the keyword-only parameters of its
    signature, which lists those it forwards to torchvision too (``hardmine.models.build``).

    Returns:
        The named settings, and whether any other keyword is accepted too (a callable with
        ``**kwargs`` in its signature, whose keys are then checked where they are used).
    """
    if dataclasses.is_dataclass(target):
        hints = typing.get_type_hints(target)
        fields = dataclasses.fields(target)
        return {f.name: hints.get(f.name, Any) for f in fields if f.init}, False
    hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    params = inspect.signature(target).parameters.values()
    # Keyword-only parameters are the settings; positional ones (a builder's num_classes) are
    # passed by the harness.
    named = {p.name: hints.get(p.name, Any) for p in params if p.kind is p.KEYWORD_ONLY}
    return named, any(p.kind is p.VAR_KEYWORD for p in params)


def _unknown(key: str, valid: Sequence[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(
        f"unknown key '{where}{key}'{hint}; valid keys: {', '.join(sorted(valid)) or '(none)'}"
    )


def _check_value(value: Any, hint: Any, where: str) -> Any:
    """Return ``value`` if it fits the type ``hint`` (ints are accepted as floats), else raise."""
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _check_value(value, option, where)
            except ConfigError:
                continue
    elif origin is typing.Literal:
        if value in typing.get_args(hint):
            return value
        raise ConfigError(f"{where}: expected one of {typing.get_args(hint)}, got {value!r}")
    elif origin in (list, Sequence, tuple):
        if isinstance(value, list | tuple):
            (item,) = typing.get_args(hint)[:1] or (Any,)
            items = [_check_value(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
            return tuple(items) if origin is tuple else items
    elif origin in (dict, Mapping):
        if isinstance(value, dict):
            return value
    elif hint is type(None):
        if value is None:
            return None
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(hint, type) and isinstance(value, hint):
        return value
    elif not isinstance(hint, type):
        return value  # a hint this checker does not model (a Protocol, a callable): trust it
    raise ConfigError(f"{where}: expected {_type_name(hint)}, got {value!r}")


def _type_name(hint: Any) -> str:
    """A type hint as a user reads it: ``int | list[int] | None``, ``'bfloat16' | None``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "None"
    if origin is not None:
        return str(hint).replace("typing.", "")
    return getattr(hint, "__name__", None) or str(hint)


def _component_from_dict(section: str, raw: Any, registries: Registries) -> ComponentConfig:
    if raw is None:
        return ComponentConfig()
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{section}: expected a mapping with a 'name', got {raw!r}")
    settings = {k: v for k, v in raw.items() if k != "name"}
    name = raw.get("name")
    if name is None:
        if settings:
            names = sorted(registries.get(section) or {})
            valid = f" (valid names: {', '.join(names)})" if names else ""
            raise ConfigError(
                f"{section}: settings {sorted(settings)} given without a name; give "
                f"{section}.name too{valid}"
            )
        return ComponentConfig()
    if not isinstance(name, str):
        raise ConfigError(f"{section}.name: expected a name, got {name!r}")
    names = registries.get(section)
    if names is None:  # a section this layer has no registry for: checked where it has one
        return ComponentConfig(name=name, settings=settings)
    if name not in names:
        raise ConfigError(
            f"{section}.name: unknown {section} {name!r}; valid names: {', '.join(sorted(names))}"
        )
    valid, open_ended = settings_of(names[name])
    for key, value in settings.items():
        if key in valid:
            settings[key] = _check_value(value, valid[key], f"{section}.{key}")
        elif not open_ended:
            raise _unknown(key, list(valid), f"{section}.")
    if dataclasses.is_dataclass(names[name]):  # a sampler or assigner, cheap to make
        _check_component(section, name, names[name], settings)
    return ComponentConfig(name=name, settings=settings)


def _check_component(section: str, name: str, cls: type, settings: Mapping[str, Any]) -> None:
    """Make the sampler / assigner ``cls(**settings)`` and run it on one image without candidates,
    so that every setting the class or its function checks is refused now, before any work.

    Raises:
        ConfigError: naming the setting (``sampler.num_bins: ...``) where the class's message names
            one, else the section.
    """
    try:
        component = cls(**settings)
        if section == "sampler":
            extra = {}
            if getattr(component, "needs_scores", False):  # PISA: the read-only pass's scores
                none = torch.zeros(0)
                extra["scores"] = [RoIScores(none, none, none, none.long(), torch.zeros(0, 4))]
            component([torch.zeros(0, 4)], [Assignment.empty(0)], losses=[torch.zeros(0)], **extra)
        elif section == "assigner":
            no_boxes = torch.zeros(0, 4)
            component(
                [no_boxes], [no_boxes], [torch.zeros(0, dtype=torch.int64)], num_per_level=[0]
            )
    except (ValueError, TypeError) as error:
        fields = [f.name for f in dataclasses.fields(cls)]
        named = [f for f in fields if re.search(rf"\b{f}\b", str(error))]
        given = [f for f in named if f in settings]
        key = (given or named)[0] if len(given or named) == 1 else None
        where = f"{section}.{key}" if key else f"{section} ({name})"
        message = str(error)
        if key and message.startswith(f"{key} "):  # "num must be ..." after "sampler.num: "
            message = message[len(key) + 1 :]
        raise ConfigError(f"{where}: {message}") from None


def _dataclass_from_dict(cls: type[Any], raw: Any, where: str, registries: Registries) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        if key not in names:
            raise _unknown(key, names, f"{where}." if where else "")
        path = f"{where}.{key}" if where else key
        if key in COMPONENT_SECTIONS and cls is RunConfig:
            values[key] = _component_from_dict(key, value, registries)
        elif dataclasses.is_dataclass(hints[key]):
            values[key] = _dataclass_from_dict(hints[key], value, path, registries)
        else:
            values[key] = _check_value(value, hints[key], path)
    return cls(**values)


def config_from_dict(raw: Mapping[str, Any], *, registries: Registries = REGISTRIES) -> RunConfig:
    """Build and check a ``RunConfig`` from nested plain data (as read from YAML).

    Args:
        raw: the nested data.
        registries: the class registry of each component section; a section without one takes
            any name and settings (see the module docstring).

    Raises:
        ConfigError: an unknown key, class name or a value of the wrong type.
    """
    config = _dataclass_from_dict(RunConfig, raw, "", registries)
    if config.data.kind not in ("scenes", "coco"):
        raise ConfigError(f"data.kind: expected 'scenes' or 'coco', got {config.data.kind!r}")
    if not 0 <= config.data.box_tolerance < float("inf"):
        raise ConfigError(
            f"data.box_tolerance: expected a finite number of pixels >= 0, got "
            f"{config.data.box_tolerance!r}"
        )
    _check_ranges(config)
    _check_paths(config)
    return config


#: The data settings that only ``data.kind: coco`` reads.
COCO_KEYS = ("root", "train_images", "train_ann", "val_images", "val_ann")


def _check_paths(config: RunConfig) -> None:
    """Raise ``ConfigError`` for an empty path (``--output_dir ''`` would write the run into the
    working folder) and for COCO paths beside ``data.kind: scenes`` (which would ignore them)."""
    for dotted in PATH_KEYS:
        value: Any = config
        for part in dotted.split("."):
            value = getattr(value, part)
        if isinstance(value, str) and not value.strip():
            raise ConfigError(f"{dotted}: an empty path; give a file or folder, or leave it out")
    if config.data.kind == "scenes":
        for key in COCO_KEYS:
            if getattr(config.data, key) is not None:
                raise ConfigError(
                    f"data.{key}: a COCO path, but data.kind is 'scenes' (the generated scenes, "
                    "which read no files); give --data.kind coco too, or leave it out"
                )


def _at_least(low: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= low), f"must be at least {low:g}"


def _fraction(value: float) -> bool:
    return 0 <= value <= 1


# The range of every harness setting that has one: a value outside is refused when the
# configuration is read, before any work (``--train.epochs 0`` would otherwise "finish" without a
# step; ``--data.batch_size 0`` would fail inside the data loader).
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": _at_least(0),
    "hard_negative_share": (_fraction, "must be in [0, 1]"),
    "negative_image_share": ((lambda v: 0 <= v < 1), "must be in [0, 1)"),
    "data.num_train": _at_least(1),
    "data.num_val": _at_least(1),
    "data.image_size": _at_least(32),
    "data.num_classes": _at_least(1),
    "data.batch_size": _at_least(1),
    "data.num_workers": _at_least(0),
    "train.epochs": _at_least(1),
    "train.lr": ((lambda v: v > 0), "must be positive"),
    "train.momentum": _at_least(0),
    "train.weight_decay": _at_least(0),
    "train.warmup_steps": _at_least(0),
    "train.warmup_factor": ((lambda v: 0 < v <= 1), "must be in (0, 1]"),
    "train.decay_at": ((lambda v: all(map(_fraction, v))), "must be fractions in [0, 1]"),
    "train.gamma": ((lambda v: v > 0), "must be positive"),
    "train.grad_clip": (
        (lambda v: v is None or 0 < v < math.inf),
        "must be positive and finite (or null)",
    ),
    "train.max_steps": ((lambda v: v is None or v >= 1), "must be at least 1 (or null)"),
    "train.log_every": _at_least(1),
    "train.eval_every": _at_least(0),
    "train.checkpoint_every": _at_least(0),
    "train.roi_loss_images": _at_least(0),
}


def _check_ranges(config: RunConfig) -> None:
    """Raise ``ConfigError`` naming the first harness setting out of its range (``_RANGES``),
    non-finite, or a ``device`` torch does not know."""
    for dotted, (ok, rule) in _RANGES.items():
        value: Any = config
        for part in dotted.split("."):
            value = getattr(value, part)
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values) or not ok(value):
            raise ConfigError(f"{dotted}: {rule}, got {value!r}")
    if config.device != "auto":
        try:
            torch.device(config.device)
        except RuntimeError:
            raise ConfigError(
                f"device: expected auto, cpu, cuda or cuda:N, got {config.device!r}"
            ) from None


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    """The plain nested data of ``config`` (lists, not tuples), component settings beside names."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, ComponentConfig):
            value = {"name": value.name, **value.settings}
        elif dataclasses.is_dataclass(value):
            value = dataclasses.asdict(value)
        out[f.name] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    """Tuples to lists, recursively, so that YAML's safe dumper can write the value."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def parse_overrides(args: Sequence[str]) -> dict[str, Any]:
    """Dotted overrides from command-line arguments, values parsed as YAML.

    ``["--train.epochs", "3", "--sampler.num=256"]`` -> ``{"train.epochs": 3, "sampler.num": 256}``.

    Raises:
        ConfigError: an argument that is not ``--key value`` or ``--key=value``.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"expected an override --section.key VALUE, got {arg!r}")
        key, eq, text = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"override --{key} has no value")
            i += 1
            text = args[i]
        out[key] = read_yaml_value(text, f"override --{key}")
        i += 1
    return out


def read_yaml_value(text: str, where: str) -> Any:
    """``text`` read as a YAML value (an empty one as ``""``).

    Raises:
        ConfigError: ``text`` is no YAML (``@1``, an unclosed quote or bracket), naming ``where``.
    """
    if not text:
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        problem = str(getattr(error, "problem", None) or "not a YAML value")
        raise ConfigError(f"{where}: {text!r} is not a YAML value ({problem})") from None


def apply_overrides(
    raw: Mapping[str, Any],
    overrides: Mapping[str, Any],
    *,
    dropped: list[str] | None = None,
) -> dict[str, Any]:
    """A copy of nested ``raw`` with each dotted key of ``overrides`` set.

    Component sections given as a bare name (``sampler: ohem``) are expanded first, so that
    ``sampler.num`` can sit beside the name. Whole sections are set before the keys inside them,
    whatever the order of ``overrides``.

    Giving a component section another class, by ``section.name`` or by a bare name for the whole
    section (``--sampler ohem``), starts that section afresh: the new class's defaults, plus only
    the settings ``overrides`` give it. A setting of the old class means nothing to the new one,
    or something else (``pos_fraction: 0.25`` of a random sampler would make OHEM keep an fg:bg
    ratio the OHEM paper removes; ATSS's ``topk`` is no max-IoU setting at all). The settings
    dropped that way are logged as a warning on the ``hardmine`` logger and, when ``dropped`` is
    given, appended to it as ``"section.key=value"``; a setting that ``overrides`` give again
    (``--sampler.name ohem --sampler.num 64``) is kept, so it is not listed. Setting the name a
    section already has changes nothing; a whole section given as a mapping replaces the old one,
    as any value does.

    Args:
        raw: nested plain data (as read from YAML).
        overrides: dotted keys to values.
        dropped: receives the dropped settings.
    """
    out: dict[str, Any] = yaml.safe_load(yaml.safe_dump(dict(raw)))  # a deep copy of plain data
    for section, name in _renamed_sections(out, overrides).items():
        old = out.get(section)
        # A setting given again in the same overrides is kept, not dropped.
        lost = [
            f"{section}.{k}={v!r}"
            for k, v in old.items()
            if k != "name" and f"{section}.{k}" not in overrides
        ]
        if lost:
            log.warning(
                "%s: %s replaces %s and starts from its defaults; dropped %s (give them again "
                "to keep them)",
                section,
                name,
                old.get("name"),
                ", ".join(lost),
            )
            if dropped is not None:
                dropped.extend(lost)
        out[section] = {"name": name}
    # Whole sections first (fewer dots), so that their keys land inside them.
    for dotted, value in sorted(overrides.items(), key=lambda item: item[0].count(".")):
        *parents, leaf = dotted.split(".")
        node = out
        for depth, part in enumerate(parents):
            child = node.get(part)
            if isinstance(child, str) and part in COMPONENT_SECTIONS:
                child = {"name": child}
            if child is not None and not isinstance(child, dict):
                # A malformed section ("train: 5") is refused, not replaced by the override's.
                where = ".".join(parents[: depth + 1])
                raise ConfigError(f"{where}: expected a mapping, got {child!r}")
            node[part] = child if isinstance(child, dict) else {}
            node = node[part]
        node[leaf] = value
    return out


def _renamed_sections(raw: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The component sections of ``raw`` holding settings whose class ``overrides`` change, with
    the new name."""
    out = {}
    for section in COMPONENT_SECTIONS:
        if f"{section}.name" in overrides:
            name = overrides[f"{section}.name"]
        elif section in overrides and (
            overrides[section] is None or isinstance(overrides[section], str)
        ):
            name = overrides[section]
        else:
            continue
        old = raw.get(section)
        if isinstance(old, Mapping) and old.get("name") != name:
            out[section] = name
    return out


def load_config(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    registries: Registries = REGISTRIES,
    dropped: list[str] | None = None,
) -> RunConfig:
    """Read a YAML configuration (or the defaults when ``path`` is None) and apply overrides.

    Args:
        path: a YAML file; keys it leaves out keep their defaults.
        overrides: dotted keys to values, e.g. from ``parse_overrides``. Another class for a
            component starts its section afresh (``apply_overrides``).
        registries: as ``config_from_dict``.
        dropped: receives the settings that a change of class dropped (see ``apply_overrides``).

    Raises:
        ConfigError: the file is missing or not YAML; an unknown key or name, or a value of the
            wrong type or out of range (named with the file when the file holds it).
    """
    raw = {} if path is None else read_yaml(path)
    # On the defaults, so that an override such as model.min_size finds the default model name.
    defaults = config_to_dict(RunConfig())
    try:
        return config_from_dict(
            apply_overrides(_merge(defaults, raw), overrides or {}, dropped=dropped),
            registries=registries,
        )
    except ConfigError as error:
        if path is None or not overrides:
            raise ConfigError(f"{path}: {error}" if path is not None else str(error)) from None
        try:  # the file alone: is the mistake in it, or in the overrides?
            config_from_dict(_merge(defaults, raw), registries=registries)
        except ConfigError as in_file:
            raise ConfigError(f"{path}: {in_file}") from None
        raise


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last,
    silently: ``lr: 0.01`` then ``lr: 0.02`` would train at 0.02 without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen and key != "<<":
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in the YAML file ``path`` (empty for a file of comments only).

    Raises:
        ConfigError: the file is missing, unreadable, empty (nothing but white space: a wrong or
            cut-off file, more likely than a wish for every default), not YAML (with the line), a
            key given twice in one mapping (with the line), or not a mapping.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a configuration file") from None
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not a text file"
        raise ConfigError(f"{path}: cannot read: {reason}") from None
    if not text.strip():
        raise ConfigError(f"{path}: the file is empty (a file of comments only gives the defaults)")
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no Python objects
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or type(error).__name__
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return dict(raw)


def _merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` laid over it, mappings merged key by key; a component section of
    another class replaces the base's (its settings belong to the base's class)."""
    out = dict(base)
    for key, value in update.items():
        old = out.get(key)
        named = not isinstance(value, Mapping) or "name" in value
        if key in COMPONENT_SECTIONS and named and _name_of(value) != _name_of(old):
            out[key] = value
        elif isinstance(value, Mapping) and isinstance(old, Mapping):
            out[key] = _merge(old, value)
        else:
            out[key] = value
    return out


def _name_of(section: Any) -> Any:
    """The class name a component section (a name, a mapping or None) gives."""
    return section.get("name") if isinstance(section, Mapping) else section


#: The settings that name files or folders: relative to the working directory of the command.
PATH_KEYS = (
    "output_dir",
    "hard_negatives",
    "negative_images",
    "data.root",
    "data.train_images",
    "data.train_ann",
    "data.val_images",
    "data.val_ann",
)
#: Settings that may differ when a run is resumed, or rerun by compare / bootstrap: they change
#: where and how often a run writes and evaluates, and how fast it loads its data, never the steps
#: it takes (the checkpoint's data order and random state do not depend on them; evaluation runs
#: under a forked random state). ``max_steps`` moves the end of a run, not its steps.
MAY_DIFFER = (
    "output_dir",
    "data.num_workers",
    "train.log_every",
    "train.eval_every",
    "train.checkpoint_every",
    "train.max_steps",
)


def flatten(config: RunConfig) -> dict[str, Any]:
    """``config`` as dotted keys to values (``{"train.lr": 0.02, "sampler.num": 128, ...}``).

    The component sections' settings sit beside their ``name``; a sampler's or assigner's include
    its defaults, so that a setting given at its default value equals one left out.
    """
    out: dict[str, Any] = {}
    for section, value in config_to_dict(config).items():
        if isinstance(value, Mapping):
            cls = REGISTRIES.get(section, {}).get(value.get("name"))
            if dataclasses.is_dataclass(cls):
                defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.init}
                value = _plain(defaults) | dict(value)
            out |= {f"{section}.{k}": v for k, v in value.items()}
        else:
            out[section] = value
    return out


def with_absolute_paths(config: RunConfig) -> RunConfig:
    """``config`` with every path of ``PATH_KEYS`` absolute (resolved against the working folder),
    so that a run's saved configuration means the same files from any folder."""
    raw = config_to_dict(config)
    updates = {}
    for dotted in PATH_KEYS:
        node: Any = raw
        for part in dotted.split("."):
            node = node[part]
        if node is not None:
            updates[dotted] = os.path.abspath(node)
    return config_from_dict(apply_overrides(raw, updates), registries={})


def differences(
    old: RunConfig, new: RunConfig, *, ignore: Sequence[str] = MAY_DIFFER
) -> list[tuple[str, Any, Any]]:
    """The settings in which ``new`` differs from ``old``: ``(dotted key, old, new)`` each.

    Paths are compared resolved against the working folder; keys in ``ignore`` are left out. A
    component section whose ``name`` differs is reported by its name alone.
    """
    a, b = flatten(with_absolute_paths(old)), flatten(with_absolute_paths(new))
    changed = [k for k in sorted(a.keys() | b.keys()) if k not in ignore and a.get(k) != b.get(k)]
    renamed = {k.split(".")[0] for k in changed if k.endswith(".name")}
    return [
        (key, a.get(key), b.get(key))
        for key in changed
        if key.split(".")[0] not in renamed or key.endswith(".name")
    ]


def describe_differences(changes: Sequence[tuple[str, Any, Any]]) -> str:
    """``[("sampler.name", "random", "ohem")]`` -> ``"sampler.name: random -> ohem"``."""
    return ", ".join(f"{key}: {_shown(old)} -> {_shown(new)}" for key, old, new in changes)


def _shown(value: Any) -> str:
    """A setting as written in a configuration: ``null`` for None, strings quoted."""
    return "null" if value is None else repr(value)


def save_config(config: RunConfig, path: str | Path) -> None:
    """Write ``config`` (atomically) as YAML that ``load_config`` reads back to an equal one."""
    write_atomic(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))
