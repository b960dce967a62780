"""COCO AP of a detector on a dataset, computed by ``faster-coco-eval`` (never by hand).

``coco_ap`` is the pure part (ground-truth dict and detection list in, numbers out); ``detect`` is
the one eval-mode detection loop (evaluation and mining both run it); ``evaluate`` runs it over a
dataset of the common interface (``hardmine.data``) and calls ``coco_ap``; ``evaluate_run`` does
that for a run directory's checkpoint.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from faster_coco_eval import COCO, COCOeval_faster
from faster_coco_eval.core import mask as mask_utils
from torch import nn
from torch.utils.data import DataLoader, Dataset

from hardmine._atomic import check_writable
from hardmine.config import ConfigError, RunConfig
from hardmine.data import coco_gt_of, collate_fn
from hardmine.engine.build import has_masks
from hardmine.engine.distributed import resolve_device
from hardmine.engine.progress import progress
from hardmine.engine.rundir import EVAL_NAME, load_run, write_json

IouType = Literal["bbox", "segm"]
# Our names for the first six of COCO's twelve summary numbers.
_STATS = {
    "AP": "AP_all",
    "AP50": "AP_50",
    "AP75": "AP_75",
    "APs": "AP_small",
    "APm": "AP_medium",
    "APl": "AP_large",
}
_PREFIX: dict[str, str] = {"bbox": "", "segm": "mask_"}


def _quiet(*_args: object, **_kwargs: object) -> None:
    """Print function for faster-coco-eval, which otherwise reports every step."""


def coco_ap(
    coco_gt: dict[str, Any],
    detections: Sequence[dict[str, Any]],
    *,
    iou_type: IouType = "bbox",
    image_ids: Collection[int] | None = None,
) -> dict[str, float | None]:
    """COCO average precision of ``detections`` against ``coco_gt``.

    Args:
        coco_gt: COCO instances dict (``images``, ``annotations`` with ``area`` and ``iscrowd``,
            ``categories``). Not modified.
        detections: COCO results, ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``
            each, plus ``"segmentation"`` (RLE) for ``iou_type="segm"``. Not modified.
        iou_type: match boxes or masks.
        image_ids: evaluate only these images (those a model was run on, when it saw part of
            the dataset); all of ``coco_gt``'s by default.

    Returns:
        ``AP`` (IoU 0.50:0.95), ``AP50``, ``AP75``, ``APs``, ``APm``, ``APl`` (small < 32², medium,
        large > 96² px of ``area``), prefixed ``mask_`` for ``segm``. No detections give 0; a
        number with no ground truth to measure (no large objects, say), which COCO writes as -1,
        is None (``null`` in JSON, ``n/a`` where printed).
    """
    if iou_type not in _PREFIX:
        raise ValueError(f"iou_type must be one of {sorted(_PREFIX)}, got {iou_type!r}")
    gt = COCO(copy.deepcopy(coco_gt), print_function=_quiet)
    # loadRes adds ids and areas to the dicts it receives.
    dt = gt.loadRes([dict(d) for d in detections])
    evaluator = COCOeval_faster(gt, dt, iouType=iou_type, print_function=_quiet)
    if image_ids is not None:
        evaluator.params.imgIds = sorted(image_ids)
    evaluator.run()
    stats = evaluator.stats_as_dict
    # COCO's -1 means "nothing to measure"; as a number it would average into tables as -100%.
    return {
        _PREFIX[iou_type] + name: None if stats[key] < 0 else float(stats[key])
        for name, key in _STATS.items()
    }


def _coco_gt_of(dataset: Dataset) -> dict[str, Any]:
    """The ``coco_gt`` of a dataset, looking through ``Subset`` wrappers."""
    coco_gt = coco_gt_of(dataset)
    if coco_gt is None:
        raise TypeError(f"{type(dataset).__name__} has no coco_gt; pass coco_gt= explicitly")
    return coco_gt


def to_coco_results(
    output: dict[str, torch.Tensor], image_id: int, *, with_masks: bool = False
) -> list[dict]:
    """One image's torchvision detections -> COCO result dicts (boxes xyxy -> xywh)."""
    xyxy = output["boxes"].detach().float().cpu()
    boxes = torch.cat([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], dim=1)
    results = [
        {"image_id": image_id, "category_id": label, "bbox": box, "score": score}
        for box, label, score in zip(
            boxes.tolist(), output["labels"].tolist(), output["scores"].tolist(), strict=True
        )
    ]
    if with_masks and results:
        # torchvision gives per-pixel probabilities [K, 1, H, W]; COCO wants binary RLE.
        binary = (output["masks"][:, 0] > 0.5).to(torch.uint8).cpu().numpy()  # [K, H, W]
        rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
        for result, rle in zip(results, rles, strict=True):
            result["segmentation"] = rle
    return results


@torch.no_grad()
def detect(
    model: nn.Module,
    data: Dataset | DataLoader,
    *,
    device: torch.device | str,
    batch_size: int = 4,
    desc: str | None = None,
) -> Iterator[tuple[dict[str, Any], dict[str, torch.Tensor]]]:
    """Run a torchvision detector in eval mode over a dataset: per image, target and detections.

    The model is put in eval mode while the loop runs and back in its previous mode after (also
    when the caller stops early).

    Args:
        model: a torchvision detector whose labels are the dataset's.
        data: a dataset of the common interface, or a ``DataLoader`` over one that yields
            ``(images, targets)`` lists (``hardmine.data.collate_fn``).
        device: where the model runs.
        batch_size: images per forward pass when ``data`` is a dataset.
        desc: show the loop's progress (``hardmine.engine.progress``) under this name.

    Yields:
        ``(target, output)`` per image in data order: the dataset's target, and the model's
        detections (``boxes`` xyxy, ``labels``, ``scores``, for Mask R-CNN ``masks``) on the
        device.
    """
    if isinstance(data, DataLoader):
        loader = data
    else:
        loader = DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    was_training = model.training
    model.eval()
    batches = loader if desc is None else progress(loader, total=len(loader), desc=desc)
    try:
        for images, targets in batches:
            outputs = model([image.to(device) for image in images])
            yield from zip(targets, outputs, strict=True)
    finally:
        model.train(was_training)


def evaluate(
    model: nn.Module,
    data: Dataset | DataLoader,
    *,
    device: torch.device | str,
    iou_types: Sequence[IouType] = ("bbox",),
    batch_size: int = 4,
    coco_gt: dict[str, Any] | None = None,
    detections_out: list[dict[str, Any]] | None = None,
) -> dict[str, float | None]:
    """Run a torchvision detector over a dataset and return its COCO AP.

    The model is put in eval mode for the run and back in its previous mode after. Only images
    the model saw are evaluated, so a ``Subset`` of a dataset is measured on itself.

    Args:
        model: a torchvision detector (eval mode returns ``boxes`` xyxy, ``labels``, ``scores``
            and, for Mask R-CNN, ``masks`` per image) whose labels are the dataset's.
        data: a dataset of the common interface, or a ``DataLoader`` over one that yields
            ``(images, targets)`` lists (``hardmine.data.collate_fn``).
        device: where the model runs.
        iou_types: ``"bbox"`` and/or ``"segm"`` (Mask R-CNN).
        batch_size: images per forward pass when ``data`` is a dataset.
        coco_gt: ground truth; the dataset's ``coco_gt`` by default.
        detections_out: receives the COCO results the AP was computed from (for an error
            breakdown, ``hardmine.report.errors``), when given.

    Returns:
        ``AP``, ``AP50``, ``AP75``, ``APs``, ``APm``, ``APl`` for boxes and the same prefixed
        ``mask_`` for masks, as ``coco_ap`` gives them.
    """
    if coco_gt is None:
        coco_gt = _coco_gt_of(data.dataset if isinstance(data, DataLoader) else data)
    with_masks = "segm" in iou_types
    detections: list[dict[str, Any]] = []
    image_ids: set[int] = set()
    for target, output in detect(
        model, data, device=device, batch_size=batch_size, desc="evaluating"
    ):
        image_id = int(target["image_id"])
        image_ids.add(image_id)
        detections.extend(to_coco_results(output, image_id, with_masks=with_masks))
    if detections_out is not None:
        detections_out.extend(detections)
    metrics: dict[str, float | None] = {}
    for iou_type in iou_types:
        metrics.update(coco_ap(coco_gt, detections, iou_type=iou_type, image_ids=image_ids))
    return metrics


def iou_types_of(config: RunConfig) -> tuple[IouType, ...]:
    """What a run's AP is measured on: boxes, and masks for Mask R-CNN."""
    return ("bbox", "segm") if has_masks(config) else ("bbox",)


#: The sections ``evaluate_run`` takes overrides of: what inference and its data read.
EVAL_SECTIONS = ("model", "data")


#: ``model.*`` settings that inference never reads (training, the loss, the read-only pass, the
#: starting weights, the architecture the checkpoint fixes), by name or pattern (``re.fullmatch``).
TRAINING_ONLY_MODEL = (
    "box_loss_beta",
    "score_dtype",
    "weights",
    "weights_backbone",
    "trainable_backbone_layers",
    "progress",
    "anchor_scale",  # the ATSS assigner's anchors, in training only
    "center_sampling_radius",
    r".*_train",
    r".*_batch_size_per_image",
    r".*_positive_fraction",
    r".*(fg|bg)_iou_thresh",
    r".*_generator",
    r".*_head",
    r".*_predictor",
    r".*_roi_pool",
    "head",
    "proposal_matcher",
    "bbox_reg_weights",
    "num_keypoints",
)
#: ``data.*`` settings that only the training set reads, or that the trained detector fixes.
TRAINING_ONLY_DATA = ("num_train", "train_images", "train_ann", "num_classes")


def check_eval_overrides(overrides: Mapping[str, Any]) -> None:
    """Raise ``ConfigError`` for an override that evaluation does not read, or that would change
    the trained detector (``model.name``): it takes ``model.*`` inference settings (e.g.
    ``model.box_nms_thresh``, ``model.min_size``) and the validation data's ``data.*``.

    A training setting (``model.box_loss_beta``, ``model.score_dtype``, ``data.num_train``; the
    lists ``TRAINING_ONLY_MODEL`` and ``TRAINING_ONLY_DATA``) is refused rather than ignored: it
    would change nothing, yet the result's file name would claim it did.
    """
    for key in overrides:
        section, _, leaf = key.partition(".")
        if section not in EVAL_SECTIONS or key in ("model", "model.name", "data"):
            raise ConfigError(
                f"unrecognised arguments: --{key} (eval takes inference overrides only: "
                "model.* other than model.name, e.g. --model.box_nms_thresh 0.55, and data.*)"
            )
        training = TRAINING_ONLY_MODEL if section == "model" else TRAINING_ONLY_DATA
        if any(re.fullmatch(pattern, leaf) for pattern in training):
            raise ConfigError(
                f"--{key}: a training setting, which evaluation does not read (it would change "
                "nothing); eval takes inference settings such as --model.box_nms_thresh, "
                "--model.min_size, --data.val_ann"
            )


def eval_file_name(overrides: Mapping[str, Any] | None = None) -> str:
    """``eval.json``, or for an evaluation with overrides a name that spells them:
    ``eval_model.box_nms_thresh=0.55.json``, so that a sweep keeps every result."""
    if not overrides:
        return EVAL_NAME
    spelled = "_".join(f"{k}={v}" for k, v in sorted(overrides.items()))
    safe = "".join(c if c.isalnum() or c in "._=-" else "-" for c in spelled)
    return f"eval_{safe}.json"


def evaluate_run(
    run_dir: str | Path,
    *,
    device: str = "auto",
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, float | None]:
    """COCO AP of a run's latest checkpoint on its validation set, also written to a JSON file.

    Inference settings can differ from the training run's without retraining: the Overlap
    Sampler paper's Table 2(c) sweeps the inference NMS threshold θ of one trained detector
    (``overrides={"model.box_nms_thresh": 0.55}``).

    Args:
        run_dir: a run directory with ``config.yaml`` and ``checkpoint.pt``.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        overrides: dotted ``model.*`` (not ``model.name``) and ``data.*`` keys.

    Returns:
        The metrics, also written to ``run_dir / eval_file_name(overrides)`` with the step and
        the overrides.

    Raises:
        ConfigError: an override of another section, or an invalid one.
    """
    overrides = dict(overrides or {})
    check_eval_overrides(overrides)
    resolved = resolve_device(device)
    run = load_run(run_dir, device=resolved, overrides=overrides)
    check_writable(run.run_dir, f"--run {run_dir}")  # where the result goes, before the work
    metrics = evaluate(run.model, run.val_set, device=resolved, iou_types=iou_types_of(run.config))
    document = {"step": run.step, "metrics": metrics}
    if overrides:
        document["overrides"] = overrides
    write_json(run.run_dir / eval_file_name(overrides), document)
    return metrics
