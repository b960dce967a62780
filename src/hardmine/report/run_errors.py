"""A comparison's error breakdowns, and what its data held.

Each finished run keeps its final evaluation's detections (``detections.json``). Here they meet
the run's validation ground truth (and, on the built-in scenes, the look-alikes of every image)
in ``hardmine.report.errors.error_breakdown``; the breakdowns are averaged per method over seeds
and written as a Markdown section. ``facts_section`` counts what the scenes held, so that a
reader sees how much each method had to act on.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Subset

from hardmine.config import config_to_dict
from hardmine.data import SceneDataset, coco_gt_of
from hardmine.engine.build import build_datasets, load_run_config
from hardmine.engine.rundir import CONFIG_NAME, DETECTIONS_NAME, read_detections
from hardmine.report.errors import (
    BACKGROUND_KINDS,
    ERROR_NAMES,
    ERROR_TYPES,
    ErrorBreakdown,
    error_breakdown,
)
from hardmine.report.stats import format_number

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MethodErrors:
    """A method's error breakdown, averaged over its runs.

    Attributes:
        runs: runs with detections.
        ap50: mean AP50 (as ``error_breakdown`` computes it: COCO's).
        delta: error type -> mean ΔAP50 from fixing it.
        counts: error type -> mean number of errors per run.
        background: ``"lookalike"`` / ``"clutter"`` -> mean background errors per run (scenes).
        background_delta: the same kinds -> mean ΔAP50 from fixing only those.
    """

    runs: int
    ap50: float
    delta: dict[str, float]
    counts: dict[str, float]
    background: dict[str, float]
    background_delta: dict[str, float]


@dataclass(frozen=True)
class _Validation:
    coco_gt: dict[str, Any]
    image_ids: list[int]
    lookalikes: dict[int, np.ndarray] | None


def _image_ids(dataset: Dataset, coco_gt: Mapping[str, Any]) -> list[int]:
    """The COCO image ids of a dataset's items, looking through ``Subset`` wrappers without
    loading images (a dataset's ``coco_gt["images"]`` is in item order)."""
    indices: list[int] | None = None
    while isinstance(dataset, Subset):
        indices = [
            dataset.indices[i] for i in (indices if indices is not None else range(len(dataset)))
        ]
        dataset = dataset.dataset
    images = coco_gt["images"]
    return [int(images[i]["id"]) for i in (indices if indices is not None else range(len(images)))]


def _lookalikes(dataset: Dataset) -> dict[int, np.ndarray] | None:
    """Image id -> look-alike boxes, for the built-in scenes (image id ``index + 1``)."""
    if not isinstance(dataset, SceneDataset):
        return None
    return {i + 1: scene.lookalike_boxes for i, scene in enumerate(dataset.scenes)}


def _validation(run_dir: Path, cache: dict[str, _Validation]) -> _Validation:
    """A run's validation ground truth, built once per data configuration."""
    config = load_run_config(run_dir / CONFIG_NAME)
    key = repr(config_to_dict(config)["data"])
    if key not in cache:
        _, val_set, _ = build_datasets(config)
        coco_gt = coco_gt_of(val_set)
        if coco_gt is None:
            raise TypeError(f"{run_dir}: the validation set has no coco_gt")
        cache[key] = _Validation(coco_gt, _image_ids(val_set, coco_gt), _lookalikes(val_set))
    return cache[key]


def run_errors(run_dir: str | Path, cache: dict[str, Any] | None = None) -> ErrorBreakdown | None:
    """The error breakdown of a finished run; None when it kept no detections.

    Args:
        run_dir: a run directory with ``config.yaml`` and ``detections.json``.
        cache: shared between calls, so that runs on the same data build it once.
    """
    run_dir = Path(run_dir)
    detections = read_detections(run_dir / DETECTIONS_NAME)
    if detections is None:
        return None
    val = _validation(run_dir, cache if cache is not None else {})
    return error_breakdown(
        val.coco_gt, detections, image_ids=val.image_ids, lookalikes=val.lookalikes
    )


def method_errors(runs: Mapping[str, Sequence[Path]]) -> dict[str, MethodErrors]:
    """Each method's error breakdown, averaged over its runs.

    A run whose breakdown cannot be computed is logged and left out: the breakdown must not sink
    the report.

    Args:
        runs: method name -> its finished runs' directories.

    Returns:
        Method name -> its ``MethodErrors``, for methods with at least one breakdown.
    """
    cache: dict[str, Any] = {}
    out = {}
    for name, dirs in runs.items():
        breakdowns = []
        for run_dir in dirs:
            try:
                result = run_errors(run_dir, cache)
            except Exception as error:  # a breakdown must not sink the report
                log.warning("error breakdown of %s failed: %s", run_dir, error)
                continue
            if result is not None:
                breakdowns.append(result)
        if not breakdowns:
            continue

        def mean(values: list[float]) -> float:
            return statistics.fmean(values)

        kinds = BACKGROUND_KINDS if all(b.background for b in breakdowns) else ()
        out[name] = MethodErrors(
            runs=len(breakdowns),
            ap50=mean([b.ap50 for b in breakdowns]),
            delta={t: mean([b.delta[t] for b in breakdowns]) for t in ERROR_TYPES},
            counts={t: mean([b.counts[t] for b in breakdowns]) for t in ERROR_TYPES},
            background={k: mean([b.background[k] for b in breakdowns]) for k in kinds},
            background_delta={k: mean([b.background_delta[k] for b in breakdowns]) for k in kinds},
        )
    return out


def errors_table(errors: Mapping[str, MethodErrors]) -> str:
    """ΔAP50 per error type and method (percent points), with the errors' mean counts."""
    with_kinds = any(e.background for e in errors.values())
    header = ["method", "AP50", *(ERROR_NAMES[t] for t in ERROR_TYPES)]
    if with_kinds:
        header += ["bkg on look-alikes", "bkg on clutter"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, e in errors.items():
        cells = [name, format_number(100 * e.ap50)]
        cells += [f"{format_number(100 * e.delta[t])} ({e.counts[t]:.0f})" for t in ERROR_TYPES]
        if with_kinds:
            cells += [
                f"{format_number(100 * e.background_delta[k])} ({e.background[k]:.0f})"
                if e.background
                else "—"
                for k in BACKGROUND_KINDS
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def errors_section(errors: Mapping[str, MethodErrors]) -> list[str]:
    """The report's "Where the AP goes" section; empty without any breakdown."""
    if not errors:
        return []
    return [
        "## Where the AP goes",
        "",
        "Error breakdown after TIDE (Bolya et al., ECCV 2020) on the final detections, at "
        "IoU 0.5 with COCO's matching: each cell is the AP50 gained, in points, by fixing all "
        "errors of that type alone (mean over seeds), with the mean number of such errors per "
        "run in brackets. Classification: right place, wrong class; localisation: right class, "
        "IoU 0.1-0.5; cls. + loc.: both wrong; duplicate: a second detection of a matched "
        "object; background: IoU under 0.1 with every object; missed: an object nothing "
        "points at. The gains overlap, so they do not add up to 100 − AP50."
        + (
            " Background errors on the scenes split into those that would be a true positive "
            "if a look-alike were an object (IoU ≥ 0.5 with one) and the rest, on clutter."
            if any(e.background for e in errors.values())
            else ""
        ),
        "",
        errors_table(errors),
        "",
    ]


def facts_section(run_dir: str | Path) -> list[str]:
    """What the built-in scenes of a run held, training and validation set; empty for other
    data or when the run cannot be read."""
    try:
        config = load_run_config(Path(run_dir) / CONFIG_NAME)
        if config.data.kind != "scenes":
            return []
        train_set, val_set, _ = build_datasets(config)
    except Exception as error:  # the facts must not sink the report
        log.warning("scene facts of %s failed: %s", run_dir, error)
        return []
    if not (isinstance(train_set, SceneDataset) and isinstance(val_set, SceneDataset)):
        return []
    rows = {"training": train_set.facts(), "validation": val_set.facts()}
    columns = [
        ("images", "images"),
        ("objects", "objects"),
        ("small", "small"),
        ("medium", "medium"),
        ("large", "large"),
        ("ignored", "ignore regions"),
        ("crowd_groups", "crowd groups"),
        ("crowded_objects", "objects in crowds"),
        ("images_with_lookalikes", "images with look-alikes"),
        ("lookalikes", "look-alikes"),
        ("clutter", "clutter bars"),
    ]
    lines = [
        "## What the scenes hold",
        "",
        "Counted from the generated images (`hardmine.data.SceneDataset.facts`): objects by "
        "COCO size range (box area under 32², under 96², above), crowd groups (2-3 overlapping "
        "objects of one class: the negatives between them are what IoU-balanced sampling and "
        "the Overlap Sampler look for), look-alikes (a class's colour on another silhouette, or "
        "its silhouette in another colour: rare hard negatives, what OHEM looks for) and "
        "clutter (easy background).",
        "",
        "| set | " + " | ".join(title for _, title in columns) + " |",
        "|" + "---|" * (len(columns) + 1),
    ]
    for name, facts in rows.items():
        lines.append("| " + name + " | " + " | ".join(str(facts[k]) for k, _ in columns) + " |")
    return [*lines, ""]
