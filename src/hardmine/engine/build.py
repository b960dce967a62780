"""A run configuration made real: its datasets, sampler, assigner, generator and detector.

``load_run_config`` reads a configuration with every registry, the detectors' included, so that a
wrong model name or setting is refused before any work; ``build_datasets`` and ``build_detector``
turn a ``RunConfig`` into the objects a run trains and evaluates. ``PickCounter`` with
``CountingSampler`` / ``CountingAssigner`` count what the loss sees, for the metrics log.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchvision.models.detection import FCOS, RetinaNet

from hardmine.config import REGISTRIES, ConfigError, Registries, RunConfig, load_config
from hardmine.data import (
    CLASS_NAMES,
    CocoDataset,
    CocoFormatError,
    ImageFolder,
    NegativeImageMix,
    coco_gt_of,
    load_hard_negatives,
    make_scenes,
    pennfudan_split,
    with_hard_negatives,
)
from hardmine.errors import DataError
from hardmine.models import DETECTORS, build
from hardmine.models._ranges import SettingError, check_model_settings
from hardmine.models.build import run_settings
from hardmine.sample import MinedNegativeSampler
from hardmine.structures import Assigner, Assignment, RoIScores, Sampler, Selection

#: Every component section's registry: the core's and the detectors' (each name's settings are
#: its builder's and ``build``'s own, ``score_dtype``: ``run_settings``).
RUN_REGISTRIES: Registries = {
    **REGISTRIES,
    "model": {name: run_settings(name) for name in DETECTORS},
}


def load_run_config(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    dropped: list[str] | None = None,
) -> RunConfig:
    """``hardmine.config.load_config`` with the detectors' registry too (``RUN_REGISTRIES``).

    ``dropped`` receives the settings an override of a component's class dropped (the section
    starts afresh from the new class's defaults; ``hardmine.config.apply_overrides``).

    Raises:
        ConfigError: an unknown key or name (the model's included), or a wrong value.
    """
    config = load_config(path, overrides, registries=RUN_REGISTRIES, dropped=dropped)
    check_run_config(config)
    return config


def check_run_config(config: RunConfig) -> None:
    """The checks ``load_run_config`` makes across sections of a loaded configuration: the
    detector's settings in range, a sampler or assigner the detector takes, data settings that go
    together (also run on each method's configuration of a comparison).

    Raises:
        ConfigError: naming the first setting at fault.
    """
    try:
        check_model_settings(config.model.name or "", config.model.settings)
    except SettingError as error:
        raise ConfigError(f"model.{error.key}: {error.rule}") from None
    if config.sampler.name is not None and _trains_on_every_anchor(config.model.name):
        raise ConfigError(
            f"sampler: {config.model.name} trains on every anchor (focal loss) and takes no "
            "sampler; pass --sampler null (its choice is the assigner: --assigner.name ...)"
        )
    assigner = REGISTRIES["assigner"].get(config.assigner.name or "")
    if getattr(assigner, "needs_levels", False) and not _trains_on_every_anchor(config.model.name):
        dense = ", ".join(sorted(n for n in DETECTORS if _trains_on_every_anchor(n)))
        raise ConfigError(
            f"assigner.name: {config.assigner.name} labels anchors on a feature pyramid; "
            f"{config.model.name} labels an RPN's proposals, which have no levels (models that "
            f"take it: {dense}; for an R-CNN: --assigner.name max_iou)"
        )
    if config.hard_negatives is not None and config.sampler.name is None:
        raise ConfigError(
            f"hard_negatives: {config.model.name} has no sampler; hard negatives join an "
            "R-CNN's RoIs, for a sampler to pick from"
        )
    data = config.data
    if data.kind == "scenes" and data.num_classes > len(CLASS_NAMES):
        raise ConfigError(
            f"data.num_classes: the scenes have {len(CLASS_NAMES)} classes at most, "
            f"got {data.num_classes}"
        )
    if data.kind == "coco" and data.root is None:
        keys = ("train_images", "train_ann", "val_images", "val_ann")
        missing = [f"data.{k}" for k in keys if getattr(data, k) is None]
        if missing:
            raise ConfigError(
                f"data.kind 'coco' needs data.root, or all of data.train_images, data.train_ann, "
                f"data.val_images and data.val_ann (missing: {', '.join(missing)})"
            )


def _trains_on_every_anchor(name: str | None) -> bool:
    """Whether the detector ``name`` is a dense one (RetinaNet, FCOS), by its builder's return
    annotation: it has no RoIs for a sampler. False when that cannot be told without building."""
    builder = DETECTORS.get(name or "")
    try:
        returns = typing.get_type_hints(builder).get("return") if builder else None
    except (NameError, TypeError):
        return False
    return isinstance(returns, type) and issubclass(returns, RetinaNet | FCOS)


def check_model(config: RunConfig) -> None:
    """Raise ``ConfigError`` unless ``config.model`` names a detector of ``DETECTORS``."""
    name = config.model.name
    if name not in DETECTORS:
        raise ConfigError(
            f"model.name: unknown model {name!r}; valid names: {', '.join(sorted(DETECTORS))}"
        )


class PickCounter:
    """Per-image positive and negative counts of what the loss sees, summed on the device.

    Counting stays on the device (no host synchronisation per step); ``take`` reads and resets.
    """

    def __init__(self) -> None:
        self._sum: Tensor | None = None  # [2]: positives, negatives
        self._images = 0

    def add(self, positive: Sequence[Tensor], negative: Sequence[Tensor]) -> None:
        """Add one batch's ``bool [N_i]`` masks of positives and negatives seen by the loss."""
        counts = torch.stack([torch.cat(positive).sum(), torch.cat(negative).sum()])
        self._sum = counts if self._sum is None else self._sum + counts
        self._images += len(positive)

    def take(self) -> dict[str, float]:
        """Mean positives and negatives per image since the last ``take`` (empty if none)."""
        if self._sum is None:
            return {}
        pos, neg = (self._sum / self._images).tolist()
        self._sum, self._images = None, 0
        return {"positive": pos, "negative": neg}

    def state_dict(self) -> dict[str, Any]:
        """The counts since the last ``take``, for a checkpoint taken between two log rows."""
        return {"sum": None if self._sum is None else self._sum.cpu(), "images": self._images}

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device) -> None:
        self._sum = None if state["sum"] is None else state["sum"].to(device)
        self._images = int(state["images"])


@dataclass(frozen=True)
class CountingSampler:
    """A sampler that also counts its picks: positive and negative candidates per image."""

    sampler: Sampler
    counter: PickCounter

    @property
    def needs_losses(self) -> bool:
        return self.sampler.needs_losses

    @property
    def needs_scores(self) -> bool:
        return getattr(self.sampler, "needs_scores", False)

    @property
    def pisa_loss(self) -> Any:
        return getattr(self.sampler, "pisa_loss", None)

    def __call__(
        self,
        boxes: Sequence[Tensor],
        assignments: Sequence[Assignment],
        *,
        losses: Sequence[Tensor] | None = None,
        mined: Sequence[Tensor] | None = None,
        scores: Sequence[RoIScores] | None = None,
        generator: torch.Generator | None = None,
    ) -> list[Selection]:
        extra = {} if scores is None else {"scores": scores}
        selections = self.sampler(
            boxes, assignments, losses=losses, mined=mined, generator=generator, **extra
        )
        self.counter.add(
            [s.mask & a.positive for s, a in zip(selections, assignments, strict=True)],
            [s.mask & a.negative for s, a in zip(selections, assignments, strict=True)],
        )
        return selections


@dataclass(frozen=True)
class CountingAssigner:
    """An assigner that also counts its positives and negatives (for detectors without a sampler,
    such as RetinaNet, whose loss sees every candidate that is not ignored)."""

    assigner: Assigner
    counter: PickCounter

    def __call__(
        self,
        candidates: Sequence[Tensor],
        gt_boxes: Sequence[Tensor],
        gt_labels: Sequence[Tensor],
        *,
        ignore_boxes: Sequence[Tensor] | None = None,
        num_per_level: Sequence[int] | None = None,
    ) -> list[Assignment]:
        assignments = self.assigner(
            candidates, gt_boxes, gt_labels, ignore_boxes=ignore_boxes, num_per_level=num_per_level
        )
        self.counter.add([a.positive for a in assignments], [a.negative for a in assignments])
        return assignments


def has_masks(config: RunConfig) -> bool:
    """Whether the detector predicts masks (Mask R-CNN): its data loads masks, its AP has both."""
    return config.model.name is not None and config.model.name.startswith("mask_rcnn")


def build_datasets(config: RunConfig) -> tuple[Dataset, Dataset, list[str]]:
    """The training set, the validation set and the category names that ``config.data`` gives.

    Masks are loaded for Mask R-CNN models only. The training set is the plain one, without the
    hard negatives of ``config.hard_negatives`` (``training_set`` adds them).

    Raises:
        ConfigError: ``data.kind`` ``"coco"`` without its files.
        CocoFormatError: an annotation file, or a file it names, is missing or unusable (named
            with the image or annotation id), or the two sets' categories differ.
    """
    data = config.data
    with_masks = has_masks(config)
    if data.kind == "scenes":
        train_set, val_set = (
            make_scenes(
                split,
                num_images=num,
                image_size=data.image_size,
                num_classes=data.num_classes,
                with_masks=with_masks,
            )
            for split, num in (("train", data.num_train), ("val", data.num_val))
        )
        categories = train_set.categories
    elif data.root is not None:
        if not Path(data.root).is_dir():
            raise DataError(
                f"data.root {data.root}: no such folder (a folder in the PennFudan layout: "
                "PNGImages/ and annotations.json)"
            )
        train_set, val_set, categories = pennfudan_split(
            data.root, with_masks=with_masks, **_coco_options(config)
        )
    else:
        paths = [data.train_images, data.train_ann, data.val_images, data.val_ann]
        if any(p is None for p in paths):
            raise ConfigError(
                "data.kind 'coco' needs data.root, or data.train_images, data.train_ann, "
                "data.val_images and data.val_ann"
            )
        train_set, val_set = (
            CocoDataset(images, ann, with_masks=with_masks, **_coco_options(config))
            for images, ann in (
                (data.train_images, data.train_ann),
                (data.val_images, data.val_ann),
            )
        )
        if val_set.categories != train_set.categories:
            raise CocoFormatError(
                f"{data.train_ann} and {data.val_ann} have different categories: "
                f"{train_set.categories} and {val_set.categories}"
            )
        categories = train_set.categories
    return train_set, val_set, categories


def _coco_options(config: RunConfig) -> dict[str, Any]:
    """``CocoDataset``'s settings in ``config.data``."""
    data = config.data
    return {
        "on_bad_box": data.on_bad_box,
        "box_tolerance": data.box_tolerance,
        "check_images": data.check_images,
    }


def training_set(config: RunConfig, train_set: Dataset) -> Dataset:
    """``train_set`` with the hard negatives of ``config.hard_negatives`` and the images without
    objects of ``config.negative_images``, if any (``NegativeImageMix``; a hard-negatives file
    mined on that folder goes to its images, by path).

    Raises:
        ConfigError: hard negatives without a sampler.
        HardNegativesFormatError: the file is unreadable or malformed, or was mined on another
            dataset (or on a folder, without ``negative_images``).
        DataError: the folder is missing, holds no image or a bad one, or is not the one the
            hard negatives were mined on.
    """
    if config.hard_negatives is not None and config.sampler.name is None:
        raise ConfigError(
            f"hard_negatives: {config.model.name} has no sampler (sampler: null); hard negatives "
            "join an R-CNN's RoIs, for a sampler to pick from"
        )
    if config.negative_images is None:
        return with_hard_negatives(
            train_set, config.hard_negatives, box_tolerance=config.data.box_tolerance
        )
    mined = None
    if config.hard_negatives is not None:
        hard = load_hard_negatives(config.hard_negatives)
        if hard.file_names:  # mined on a folder: its boxes go to the folder's images, by path
            mined = hard
        else:
            train_set = with_hard_negatives(
                train_set, config.hard_negatives, box_tolerance=config.data.box_tolerance
            )
    coco_gt = coco_gt_of(train_set)
    ids = [im["id"] for im in coco_gt["images"]] if coco_gt is not None else []
    folder = ImageFolder(
        config.negative_images,
        categories=getattr(train_set, "categories", ()),
        first_id=max(ids, default=len(train_set)) + 1,  # the folder's ids follow the set's
        check_images=config.data.check_images,
    )
    return NegativeImageMix(
        train_set, folder, share=config.negative_image_share, seed=config.seed, mined=mined
    )


def build_sampler(config: RunConfig) -> Sampler | None:
    """The sampler of ``config``, around it the mined-negative share with ``hard_negatives``."""
    if config.sampler.name is None:
        return None
    sampler = REGISTRIES["sampler"][config.sampler.name](**config.sampler.settings)
    if config.hard_negatives is not None:
        sampler = MinedNegativeSampler(sampler, share=config.hard_negative_share)
    return sampler


def build_assigner(config: RunConfig) -> Assigner | None:
    """The assigner of ``config``; None leaves the detector its own."""
    if config.assigner.name is None:
        return None
    return REGISTRIES["assigner"][config.assigner.name](**config.assigner.settings)


def build_detector(
    config: RunConfig,
    num_classes: int,
    counter: PickCounter | None = None,
    *,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """The detector of ``config`` with its sampler, assigner and generator.

    Args:
        config: the run configuration.
        num_classes: object classes, without the background.
        counter: receives the picks in training (the sampler's, or without one the assigner's).
        generator: the samplers' generator; torch's global RNG when None.

    Raises:
        ConfigError: the model is not in ``DETECTORS``.
    """
    check_model(config)
    sampler = build_sampler(config)
    assigner = build_assigner(config)
    if counter is not None:
        if sampler is not None:
            sampler = CountingSampler(sampler, counter)
        elif assigner is not None:
            assigner = CountingAssigner(assigner, counter)
    return build(
        config.model.name,
        num_classes + 1,  # torchvision's class 0 is the background
        sampler=sampler,
        assigner=assigner,
        generator=generator,
        **config.model.settings,
    )
