"""Mining a trained run, and bootstrapping rounds: train -> mine -> train with the mined negatives.

``bootstrap`` runs ``rounds`` trainings in ``OUTPUT/round<r>``. Round 0 trains as configured;
every later round trains afresh, from the same seed, with the false positives that the previous
round's detector made on the training images as extra background RoIs. Each round's hard
negatives *replace* the previous ones rather than add to them: what the new detector no longer
fires on is no longer hard (the cache shrinking of Felzenszwalb et al., PAMI 2010), and the file
stays the size of one mining. Retraining from the same seed (initial weights, data order) rather
than fine-tuning keeps the rounds comparable: they differ in the mined negatives, and in the
sampler's random draws, which the mined boxes shift.

Reruns skip finished rounds and resume interrupted ones, as ``hardmine compare`` does. A rerun with
other settings is refused before any work, naming them: a round's training settings (checked
against the ``config.yaml`` it was trained with), and the mining settings of a hard-negatives file
that a later round has started training on (that file is never written again).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hardmine._atomic import check_writable, write_atomic
from hardmine.config import (
    RunConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    describe_differences,
    differences,
)
from hardmine.data import (
    HardNegatives,
    ImageFolder,
    coco_gt_of,
    load_hard_negatives,
    save_hard_negatives,
)
from hardmine.engine.build import RUN_REGISTRIES, load_run_config
from hardmine.engine.distributed import resolve_device
from hardmine.engine.evaluate import coco_ap, to_coco_results
from hardmine.engine.rundir import CONFIG_NAME, load_run, write_json
from hardmine.engine.train import train
from hardmine.errors import ConfigError, RunError
from hardmine.mine.detections import check_overwrite, detect, mine, warn_unfinished
from hardmine.mine.falsepos import fp_per_image_at_recall
from hardmine.mine.images import fp_per_image_at_score, mine_folder

HARD_NEGATIVES_NAME = "hard_negatives.json"
REPORT_NAME = "bootstrap.md"


def mine_run(
    run_dir: str | Path,
    *,
    output: str | Path | None = None,
    device: str = "auto",
    overrides: Mapping[str, Any] | None = None,
    iou_thr: float = 0.5,
    top_k: int | None = None,
    score_thr: float | None = None,
    batch_size: int = 4,
) -> tuple[Path, HardNegatives]:
    """``hardmine mine``: mine a run's detector on its training set and write the file.

    Args:
        run_dir: the run directory.
        output: the hard-negatives file; ``RUN_DIR/hard_negatives.json`` by default.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        overrides: dotted configuration overrides (other ``data.*`` to mine on).
        iou_thr: a detection overlapping any ground truth by this much is not mined.
        top_k: at most this many per image.
        score_thr: only detections scoring at least this.
        batch_size: images per forward pass.

    Returns:
        The file's path and its contents.

    Raises:
        RunError: ``output`` exists and holds hard negatives mined with other settings (a run
            may have trained on it), or is not a hard-negatives file: it is not overwritten.
    """
    path = Path(output) if output is not None else Path(run_dir) / HARD_NEGATIVES_NAME
    check_overwrite(path, {"iou_thr": iou_thr, "top_k": top_k, "score_thr": score_thr})
    check_writable(path.parent, f"--output {path}")
    resolved = resolve_device(device)
    run = load_run(run_dir, device=resolved, overrides=overrides)
    warn_unfinished(run)
    hard = mine(
        run.model,
        run.train_set,
        device=resolved,
        iou_thr=iou_thr,
        top_k=top_k,
        score_thr=score_thr,
        batch_size=batch_size,
        source=str(run_dir),
    )
    return save_hard_negatives(hard, path), hard


@dataclass(frozen=True)
class RoundResult:
    """One bootstrapping round.

    Attributes:
        round: 0-based.
        run_dir: its run directory.
        trained_with: hard negatives in its training set (0 in round 0).
        ap: COCO AP on the validation set (None: no ground truth to measure it on).
        ap50: AP at IoU 0.5 (likewise).
        fp_per_image: false positives per validation image at the fixed recall (``inf``: the
            recall is never reached).
        mined: hard negatives it yields for the next round (None after the last round).
        fp_per_background_image: with a folder of images without objects, detections per
            image of its validation folder scoring at least the fixed score (None without).
    """

    round: int
    run_dir: str
    trained_with: int
    ap: float | None
    ap50: float | None
    fp_per_image: float
    mined: int | None
    fp_per_background_image: float | None = None


def bootstrap(
    config: RunConfig,
    *,
    rounds: int,
    output_dir: str | Path,
    iou_thr: float = 0.5,
    top_k: int | None = None,
    score_thr: float | None = None,
    share: float = 0.25,
    recall: float = 0.5,
    negative_images: str | Path | None = None,
    negative_image_share: float = 0.25,
    negative_val: str | Path | None = None,
    fp_score: float = 0.5,
) -> list[RoundResult]:
    """Train, mine, train again, ``rounds`` trainings in all; writes ``OUTPUT/bootstrap.md``.

    With ``negative_images``, classic bootstrapping over a folder of images that hold none of the
    classes (Sung & Poggio; Dalal & Triggs): every round trains with the folder's images as
    images without objects (``negative_image_share`` of each epoch's images), and the mining is
    over the folder, not the training images; after round 0 the previous round's detections on
    the folder join those images' RoIs as background. Each round is also measured by its false
    positives per image of ``negative_val`` (the folder itself when None) scoring at least
    ``fp_score``: the quantity bootstrapping exists to lower.

    Args:
        config: the base configuration; every round uses it with its own ``output_dir``
            (``OUTPUT/round<r>``) and, after round 0, the previous round's hard negatives.
        rounds: trainings, at least 1 (1 is the plain run, reported the same way).
        output_dir: where the rounds and the report go.
        iou_thr: mining: a detection overlapping a ground truth by this much is not mined.
        top_k: mining: at most this many per image.
        score_thr: mining: only detections scoring at least this.
        share: fraction of the negative picks guaranteed to mined boxes.
        recall: the recall at which false positives per image are reported.
        negative_images: a folder of images without objects to train with and to mine.
        negative_image_share: the fraction of each epoch's images taken from it, in ``[0, 1)``.
        negative_val: a folder of images without objects to count false positives on.
        fp_score: the score at which they are counted.

    Returns:
        One ``RoundResult`` per round.

    Raises:
        ConfigError: a setting out of range, or more than one round of a detector without a
            sampler (ATSS, RetinaNet, FCOS: hard negatives join an R-CNN's RoIs).
        RunError: a rerun whose settings differ from those a round in ``output_dir`` was trained
            with, or from those of a hard-negatives file a later round trained on (named).
    """
    if rounds < 1:
        raise ConfigError(f"rounds must be at least 1, got {rounds}")
    if not 0 <= share <= 1:
        raise ConfigError(f"share must be in [0, 1], got {share}")
    if not 0 < recall <= 1:
        raise ConfigError(f"recall must be in (0, 1], got {recall}")
    if negative_images is None and negative_val is not None:
        raise ConfigError(
            "negative_val counts false positives of a bootstrap over a folder: give "
            "negative_images too"
        )
    check_writable(output_dir, f"--output {output_dir}")
    output_dir = Path(output_dir)
    device = resolve_device(config.device)
    mining = {"iou_thr": iou_thr, "top_k": top_k, "score_thr": score_thr}
    folder = None if negative_images is None else str(negative_images)
    configs = _round_configs(
        config, rounds, output_dir, share, negative_images=folder, image_share=negative_image_share
    )
    if rounds > 1 and config.sampler.name is None:  # before any work, not after round 0
        raise ConfigError(
            f"hard_negatives: {config.model.name} has no sampler (sampler: null); the rounds "
            "after the first train with hard negatives, which join an R-CNN's RoIs for a "
            "sampler to pick from: use an R-CNN, or --rounds 1"
        )
    _check_rerun(configs, mining)  # before any work
    for checked in (folder, negative_val):  # before any work or output, too (each named)
        if checked is not None:
            ImageFolder(checked, check_images=config.data.check_images)
    results: list[RoundResult] = []
    trained_with = 0
    for r, round_config in enumerate(configs):
        run_dir = Path(round_config.output_dir)
        train(round_config, resume=True)  # a finished round returns at once
        run = load_run(run_dir, device=device)
        model, train_set, val_set = run.model, run.train_set, run.val_set
        check = config.data.check_images
        pool = (
            None
            if folder is None
            else ImageFolder(folder, categories=run.categories, check_images=check)
        )
        val_pool = pool
        if negative_val is not None:
            val_pool = ImageFolder(negative_val, categories=run.categories, check_images=check)
        val = detect(
            model, val_set, device=device, batch_size=config.data.batch_size, desc="evaluating"
        )
        coco_gt = coco_gt_of(val_set)
        if coco_gt is None:
            raise TypeError(f"{type(val_set).__name__} has no coco_gt to measure AP against")
        coco_results = [
            r
            for d in val
            for r in to_coco_results(
                {"boxes": d.boxes, "labels": d.labels, "scores": d.scores}, d.image_id
            )
        ]
        ap = coco_ap(coco_gt, coco_results, image_ids={d.image_id for d in val})
        fp = fp_per_image_at_recall(val, recall=recall, iou_thr=0.5)
        mined, pool_detections = None, None
        if r + 1 < rounds:
            path = run_dir / HARD_NEGATIVES_NAME
            hard = load_hard_negatives(path) if path.exists() else None
            if hard is None or dict(hard.settings) != mining:  # (re)mined only if unconsumed
                if pool is None:
                    hard = mine(
                        model,
                        train_set,
                        device=device,
                        batch_size=config.data.batch_size,
                        source=str(run_dir),
                        **mining,
                    )
                else:
                    hard, pool_detections = mine_folder(
                        model,
                        pool,
                        device=device,
                        top_k=top_k,
                        score_thr=score_thr,
                        batch_size=config.data.batch_size,
                        source=str(run_dir),
                    )
                save_hard_negatives(hard, path)
            mined = hard.num_boxes
        fp_background = None
        if val_pool is not None:
            if val_pool is not pool or pool_detections is None:
                pool_detections = detect(
                    model,
                    val_pool,
                    device=device,
                    batch_size=config.data.batch_size,
                    desc="counting false positives",
                )
            fp_background = fp_per_image_at_score(pool_detections, fp_score)
        results.append(
            RoundResult(
                r, str(run_dir), trained_with, ap["AP"], ap["AP50"], fp, mined, fp_background
            )
        )
        trained_with = mined or 0
        write_report(
            output_dir,
            results,
            recall=recall,
            fp_score=fp_score,
            folders=None if pool is None else (str(pool.root), str(val_pool.root)),
        )
    return results


def _round_configs(
    config: RunConfig,
    rounds: int,
    output_dir: Path,
    share: float,
    *,
    negative_images: str | None = None,
    image_share: float = 0.25,
) -> list[RunConfig]:
    """Each round's configuration: ``config`` in ``OUTPUT/round<r>``, after round 0 with the
    previous round's hard negatives (with ``negative_images``, every round with the folder)."""
    configs = []
    for r in range(rounds):
        overrides: dict[str, Any] = {"output_dir": str(output_dir / f"round{r}")}
        if negative_images is not None:
            overrides |= {
                "negative_images": negative_images,
                "negative_image_share": image_share,
            }
        if r > 0:
            previous = output_dir / f"round{r - 1}" / HARD_NEGATIVES_NAME
            overrides |= {"hard_negatives": str(previous), "hard_negative_share": share}
        configs.append(
            config_from_dict(
                apply_overrides(config_to_dict(config), overrides), registries=RUN_REGISTRIES
            )
        )
    return configs


def _check_rerun(configs: Sequence[RunConfig], mining: Mapping[str, Any]) -> None:
    """Refuse a rerun whose settings differ from what the rounds on disk were made with.

    A round that has started (its ``config.yaml`` exists) must have the same training settings
    (``hardmine.config.differences``); the hard-negatives file it trains on must have been mined
    with ``mining``, since it is never mined again once a round has trained on it.

    Raises:
        RunError: naming the round or file and the settings that differ.
    """
    for r, config in enumerate(configs):
        run_dir = Path(config.output_dir)
        if not (run_dir / CONFIG_NAME).exists():
            continue
        changes = differences(load_run_config(run_dir / CONFIG_NAME), config)
        if changes:
            raise RunError(
                f"{run_dir} was trained with other settings ({describe_differences(changes)}); "
                "rerun with those, or choose another --output"
            )
        if r == 0:
            continue
        consumed = Path(configs[r - 1].output_dir) / HARD_NEGATIVES_NAME
        if not consumed.exists():
            raise RunError(
                f"round {r} ({run_dir}) trained on {consumed}, which is gone; delete {run_dir} "
                "to train it again, or choose another --output"
            )
        settings = dict(load_hard_negatives(consumed).settings)
        if settings != dict(mining):
            changed = [
                (f"--{k.replace('_', '-')}", settings.get(k), v)
                for k, v in mining.items()
                if settings.get(k) != v
            ]
            raise RunError(
                f"{consumed} was mined with other settings ({describe_differences(changed)}) and "
                f"round {r} trained on it; rerun with those, or choose another --output"
            )


def format_rounds(
    results: Sequence[RoundResult], *, recall: float, fp_score: float | None = None
) -> str:
    """The rounds as a markdown table (AP in percent); with ``fp_score``, a column of false
    positives per background image at that score."""
    background = fp_score is not None and any(
        r.fp_per_background_image is not None for r in results
    )
    header = "| round | hard negatives trained with | AP | AP50 | FP / image @ recall "
    header += f"{recall:g} |"
    if background:
        header += f" FP / background image @ score {fp_score:g} |"
    header += " mined for next round |"
    lines = [header, "|" + "---:|" * (7 if background else 6)]
    for r in results:
        fp = "not reached" if math.isinf(r.fp_per_image) else f"{r.fp_per_image:.2f}"
        mined = "-" if r.mined is None else str(r.mined)
        cells = [str(r.round), str(r.trained_with), _pct(r.ap), _pct(r.ap50), fp]
        if background:
            value = r.fp_per_background_image
            cells.append("-" if value is None else f"{value:.2f}")
        cells.append(mined)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pct(ap: float | None) -> str:
    return "n/a" if ap is None else f"{100 * ap:.1f}"


def write_report(
    output_dir: Path,
    results: Sequence[RoundResult],
    *,
    recall: float,
    fp_score: float | None = None,
    folders: tuple[str, str] | None = None,
) -> Path:
    """``bootstrap.md`` (the table) and ``bootstrap.json`` (the numbers) in ``output_dir``.

    ``folders``: the folder of images without objects mined, and the one false positives are
    counted on, for a bootstrap over a folder.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    rows = [
        asdict(r) | {"fp_per_image": None if math.isinf(r.fp_per_image) else r.fp_per_image}
        for r in results
    ]
    document: dict[str, Any] = {"recall": recall, "rounds": rows}
    if folders is not None:
        document |= {
            "fp_score": fp_score,
            "negative_images": folders[0],
            "negative_val": folders[1],
        }
    write_json(output_dir / "bootstrap.json", document)
    if folders is None:
        text = (
            "Each round trains afresh; after round 0 with the false positives of the previous "
            "round's detector on the training images as extra background RoIs. Validation AP; "
            f"false positives per image at recall {recall:g}."
        )
    else:
        text = (
            f"Each round trains afresh, with the images of {folders[0]} (no objects) among the "
            "training images; after round 0 with the previous round's detections on them as "
            "extra background RoIs. Validation AP; false positives per validation image at "
            f"recall {recall:g}; detections per image of {folders[1]} (no objects) scoring at "
            f"least {fp_score:g}."
        )
    return write_atomic(
        output_dir / REPORT_NAME,
        "# Bootstrapping rounds\n\n"
        + text
        + "\n\n"
        + format_rounds(results, recall=recall, fp_score=fp_score if folders else None)
        + "\n",
    )
