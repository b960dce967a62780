"""Where a detector's AP goes: an error breakdown after TIDE (Bolya et al., ECCV 2020).

Detections are matched to the ground truth exactly as COCO evaluation does at IoU 0.5 (per image
and category, the 100 best-scoring detections greedily in score order, each to the unmatched
ground truth it overlaps most; a detection on a crowd / ignore region is ignored, with IoU there
measured over the detection's area), so ``ErrorBreakdown.ap50`` is COCO's AP50. Every false
positive is then given one error type, tested in TIDE's order (its ``quantify.py``), with
``IoU_f = 0.5`` (foreground) and ``IoU_b = 0.1`` (background), IoU over the non-ignored ground
truths:

1. **loc** (localisation): IoU_b <= IoU < IoU_f with a ground truth of its class;
2. **cls** (classification): IoU >= IoU_f with a ground truth of another class;
3. **dupe** (duplicate): IoU >= IoU_f with a ground truth of its class that a higher-scoring
   detection already matched;
4. **bkg** (background): IoU <= IoU_b with every ground truth;
5. **both** (classification and localisation): anything else, i.e. IoU_b < IoU < IoU_f with a
   ground truth of another class only.

and every ground truth no detection matched, and no loc or cls error points at, is **miss**.
Each type's ΔAP is TIDE's "fixing oracle": the AP50 after fixing all errors of that type alone,
minus the AP50 before (at least 0). A cls / loc error is fixed by giving the detection its ground
truth's class / box, which makes it a true positive unless that ground truth is already matched
(then it is removed, as is every other error pointing at the same ground truth than the
best-scoring one); dupe, bkg and both errors are removed; a missed ground truth is taken out of
the count. The ΔAPs do not add up to 100 - AP50: errors overlap, as in TIDE.

On the built-in scenes background errors are split further: **on a look-alike** when the false
positive would be a true positive (IoU >= IoU_f) if one of the image's look-alikes
(``hardmine.data.Scene.lookalike_boxes``) were an object, **on clutter** otherwise; each with its
own ΔAP.

``tidecv`` (TIDE's own package, 1.0.1) installs with NumPy 2 and its core runs, but it is
unmaintained since 2021, needs OpenCV, pandas and seaborn at import, and matches with pycocotools
in its own way; this module follows its definitions on COCO's matching instead.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: TIDE's six main error types, in its table's order.
ERROR_TYPES = ("cls", "loc", "both", "dupe", "bkg", "miss")
#: What each type means, for reports.
ERROR_NAMES = {
    "cls": "classification",
    "loc": "localisation",
    "both": "cls. + loc.",
    "dupe": "duplicate",
    "bkg": "background",
    "miss": "missed",
}
BACKGROUND_KINDS = ("lookalike", "clutter")
FOREGROUND_IOU = 0.5
BACKGROUND_IOU = 0.1
MAX_DETS = 100
_REC_THRS = np.linspace(0.0, 1.0, 101)  # COCO's recall thresholds


@dataclass(frozen=True)
class ErrorBreakdown:
    """The AP50 of a set of detections and what each kind of error costs it.

    Attributes:
        ap50: COCO's AP at IoU 0.5, in [0, 1].
        delta: error type (``ERROR_TYPES``) -> ΔAP50 from fixing it alone, in [0, 1].
        counts: error type -> how many errors of that type.
        background: ``"lookalike"`` / ``"clutter"`` -> how many background errors lie on a
            look-alike / elsewhere; empty when no look-alikes were given.
        background_delta: the same kinds -> ΔAP50 from fixing only those.
    """

    ap50: float
    delta: dict[str, float]
    counts: dict[str, int]
    background: dict[str, int] = field(default_factory=dict)
    background_delta: dict[str, float] = field(default_factory=dict)


def _xyxy(xywh: np.ndarray) -> np.ndarray:
    return np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)


def _iou(dets: np.ndarray, gts: np.ndarray, crowd: np.ndarray | None = None) -> np.ndarray:
    """``[D, G]`` IoU of xyxy boxes, over the detection's area where ``crowd`` (COCO's rule)."""
    lt = np.maximum(dets[:, None, :2], gts[None, :, :2])
    rb = np.minimum(dets[:, None, 2:], gts[None, :, 2:])
    inter = (rb - lt).clip(min=0).prod(2)
    area_d = (dets[:, 2:] - dets[:, :2]).prod(1)[:, None]
    area_g = (gts[:, 2:] - gts[:, :2]).prod(1)[None, :]
    union = area_d + area_g - inter
    if crowd is not None:
        union = np.where(crowd[None, :], area_d, union)
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


@dataclass
class _Det:
    """One kept detection and what the matching and the error analysis made of it."""

    index: int
    category: int
    score: float
    tp: bool = False
    ignored: bool = False
    error: str | None = None
    target: int | None = None  # the ground truth a cls / loc error points at (global index)
    lookalike: bool = False


def _match_image(
    dets: list[_Det],
    boxes: np.ndarray,
    gt_boxes: np.ndarray,
    gt_cat: np.ndarray,
    gt_crowd: np.ndarray,
    gt_index: np.ndarray,
    used: np.ndarray,
) -> None:
    """COCO's ``evaluateImg`` matching at IoU ``FOREGROUND_IOU``, for one image, every category.

    Sets ``tp`` / ``ignored`` on ``dets`` (already cut to ``MAX_DETS`` per category and sorted
    by score) and marks matched ground truths in ``used`` (global indices).
    """
    for category in sorted({d.category for d in dets}):
        cat_dets = [d for d in dets if d.category == category]
        in_cat = np.flatnonzero(gt_cat == category)
        if not in_cat.size:
            continue
        # Non-ignored ground truths first, as COCO sorts them (stable).
        order = in_cat[np.argsort(gt_crowd[in_cat], kind="stable")]
        crowd = gt_crowd[order]
        ious = _iou(boxes[[d.index for d in cat_dets]], gt_boxes[order], crowd)
        matched = np.zeros(order.size, dtype=bool)
        for row, det in enumerate(cat_dets):
            best, m = min(FOREGROUND_IOU, 1 - 1e-10), -1
            for g in range(order.size):
                if matched[g] and not crowd[g]:
                    continue
                if m > -1 and not crowd[m] and crowd[g]:
                    break  # matched a real object; ignore regions come after
                if ious[row, g] < best:
                    continue
                best, m = ious[row, g], g
            if m == -1:
                continue
            matched[m] = True
            if crowd[m]:
                det.ignored = True
            else:
                det.tp = True
                used[gt_index[order[m]]] = True


def _classify(
    dets: list[_Det],
    boxes: np.ndarray,
    gt_boxes: np.ndarray,
    gt_cat: np.ndarray,
    gt_index: np.ndarray,
    used: np.ndarray,
    lookalikes: np.ndarray | None,
) -> None:
    """TIDE's error type of an image's false positives ``dets`` against its non-ignored ground
    truths (``boxes``: the image's detection boxes, indexed by ``_Det.index``)."""
    if not dets:
        return
    box = boxes[[d.index for d in dets]]
    if gt_boxes.shape[0] == 0:
        errors = np.full(len(dets), "bkg", dtype=object)
        targets = np.full(len(dets), -1)
    else:
        iou = _iou(box, gt_boxes)  # [F, G]
        same = np.array([d.category for d in dets])[:, None] == gt_cat[None, :]
        same_iou = np.where(same, iou, 0.0)
        other_iou = np.where(same, 0.0, iou)
        used_iou = np.where(same & used[gt_index][None, :], iou, 0.0)
        same_max, other_max = same_iou.max(1), other_iou.max(1)
        loc = (same_max >= BACKGROUND_IOU) & (same_max < FOREGROUND_IOU)
        cls = ~loc & (other_max >= FOREGROUND_IOU)
        dupe = ~loc & ~cls & (used_iou.max(1) >= FOREGROUND_IOU)
        bkg = ~loc & ~cls & ~dupe & (iou.max(1) <= BACKGROUND_IOU)
        errors = np.select([loc, cls, dupe, bkg], ["loc", "cls", "dupe", "bkg"], "both")
        targets = np.where(
            loc, gt_index[same_iou.argmax(1)], np.where(cls, gt_index[other_iou.argmax(1)], -1)
        )
    on_lookalike = np.zeros(len(dets), dtype=bool)
    if lookalikes is not None and lookalikes.shape[0]:
        on_lookalike = _iou(box, lookalikes).max(1) >= FOREGROUND_IOU
    for det, error, target, look in zip(dets, errors, targets, on_lookalike, strict=True):
        det.error = str(error)
        det.target = int(target) if target >= 0 else None
        det.lookalike = bool(look) and det.error == "bkg"


def _ap(points: Mapping[int, list[tuple[float, bool]]], num_gt: Mapping[int, int]) -> float:
    """COCO's 101-point interpolated AP per category, averaged over the categories in ``num_gt``
    (those with ground truth to begin with). Points are ``(score, is_true_positive)`` in the
    order COCO concatenates them (image by image, each by score); a category left with no ground
    truth after a fix counts 0, as in TIDE."""
    aps = []
    for category, count in num_gt.items():
        pts = points.get(category, [])
        if count <= 0:
            aps.append(0.0)
            continue
        if not pts:
            aps.append(0.0)
            continue
        scores = np.array([s for s, _ in pts])
        order = np.argsort(-scores, kind="mergesort")
        tp = np.array([t for _, t in pts], dtype=bool)[order]
        tp_sum = np.cumsum(tp).astype(float)
        fp_sum = np.cumsum(~tp).astype(float)
        recall = tp_sum / count
        precision = tp_sum / (tp_sum + fp_sum + np.spacing(1))
        precision = np.maximum.accumulate(precision[::-1])[::-1]  # COCO's envelope
        inds = np.searchsorted(recall, _REC_THRS, side="left")
        q = np.where(inds < precision.size, precision[np.minimum(inds, precision.size - 1)], 0)
        aps.append(float(q.mean()))
    return float(np.mean(aps)) if aps else float("nan")


def error_breakdown(
    coco_gt: Mapping[str, Any],
    detections: Sequence[Mapping[str, Any]],
    *,
    image_ids: Collection[int] | None = None,
    lookalikes: Mapping[int, np.ndarray] | None = None,
) -> ErrorBreakdown:
    """AP50 and TIDE's ΔAP50 per error type of ``detections`` (see the module docstring).

    Args:
        coco_gt: COCO instances dict (``images``, ``annotations`` with ``bbox`` xywh and
            ``iscrowd``, ``categories``).
        detections: COCO results: ``image_id``, ``category_id``, ``bbox`` xywh, ``score``.
        image_ids: evaluate only these images; all of ``coco_gt``'s by default.
        lookalikes: image id -> ``float [D, 4]`` xyxy look-alike boxes, to split background
            errors into those on a look-alike and those on clutter.

    Returns:
        The ``ErrorBreakdown``; AP values in [0, 1].
    """
    ids = sorted(image_ids if image_ids is not None else (im["id"] for im in coco_gt["images"]))
    wanted = set(ids)
    anns_of: dict[int, list[Mapping[str, Any]]] = {i: [] for i in ids}
    for ann in coco_gt["annotations"]:
        if ann["image_id"] in wanted:
            anns_of[ann["image_id"]].append(ann)
    dets_of: dict[int, list[Mapping[str, Any]]] = {i: [] for i in ids}
    for det in detections:
        if det["image_id"] in wanted:
            dets_of[det["image_id"]].append(det)

    # Every non-ignored ground truth gets a global index, for "matched" flags and fixes.
    num_gt: dict[int, int] = {}
    gt_cat_all: list[int] = []
    images = []
    for image_id in ids:
        anns = anns_of[image_id]
        gt_boxes = _xyxy(np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4))
        gt_cat = np.array([a["category_id"] for a in anns], dtype=np.int64)
        gt_crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
        gt_index = np.full(len(anns), -1, dtype=np.int64)
        for k in np.flatnonzero(~gt_crowd):
            gt_index[k] = len(gt_cat_all)
            gt_cat_all.append(int(gt_cat[k]))
            num_gt[int(gt_cat[k])] = num_gt.get(int(gt_cat[k]), 0) + 1
        images.append((image_id, gt_boxes, gt_cat, gt_crowd, gt_index))
    used = np.zeros(len(gt_cat_all), dtype=bool)

    kept: list[_Det] = []  # every detection COCO keeps, image by image, each image by score
    for image_id, gt_boxes, gt_cat, gt_crowd, gt_index in images:
        raw = dets_of[image_id]
        boxes = _xyxy(np.array([d["bbox"] for d in raw], dtype=np.float64).reshape(-1, 4))
        dets = [
            _Det(index=k, category=int(d["category_id"]), score=float(d["score"]))
            for k, d in enumerate(raw)
        ]
        # COCO: per category, the MAX_DETS best by score (stable for ties).
        per_image: list[_Det] = []
        for category in sorted({d.category for d in dets}):
            cat_dets = [d for d in dets if d.category == category]
            order = np.argsort([-d.score for d in cat_dets], kind="mergesort")[:MAX_DETS]
            per_image += [cat_dets[i] for i in order]
        _match_image(per_image, boxes, gt_boxes, gt_cat, gt_crowd, gt_index, used)
        kept += per_image
        real = ~gt_crowd
        look = None
        if lookalikes is not None:
            look = np.asarray(lookalikes.get(image_id, np.zeros((0, 4))), dtype=np.float64)
        _classify(
            [d for d in per_image if not d.tp and not d.ignored],
            boxes,
            gt_boxes[real],
            gt_cat[real],
            gt_index[real],
            used,
            look,
        )

    # TIDE's BestGTMatch: of the cls / loc errors pointing at an unmatched ground truth, only the
    # best-scoring one can be fixed into a true positive; the others are removed.
    best: dict[int, _Det] = {}
    for det in kept:
        fixable = det.error in ("cls", "loc") and det.target is not None and not used[det.target]
        if fixable and (det.target not in best or det.score > best[det.target].score):
            best[det.target] = det
    usable = set(best)
    missed = [g for g in range(len(gt_cat_all)) if not used[g] and g not in usable]

    def ap_after(fix: str | None, kind: str | None = None) -> float:
        points: dict[int, list[tuple[float, bool]]] = {}
        counts = dict(num_gt)
        for det in kept:
            if det.ignored:
                continue
            category, tp = det.category, det.tp
            if det.error is not None and det.error == fix and (kind is None or _kind(det) == kind):
                if det.error in ("cls", "loc") and best.get(det.target) is det:  # type: ignore[arg-type]
                    category, tp = gt_cat_all[det.target], True  # type: ignore[index]
                else:
                    continue  # removed
            points.setdefault(category, []).append((det.score, tp))
        if fix == "miss":
            for g in missed:
                counts[gt_cat_all[g]] -= 1
        return _ap(points, counts)

    base = ap_after(None)
    delta = {t: max(ap_after(t) - base, 0.0) for t in ERROR_TYPES}
    counts = {t: sum(d.error == t for d in kept) for t in ERROR_TYPES}
    counts["miss"] = len(missed)
    background, background_delta = {}, {}
    if lookalikes is not None:
        for kind in BACKGROUND_KINDS:
            background[kind] = sum(d.error == "bkg" and _kind(d) == kind for d in kept)
            background_delta[kind] = max(ap_after("bkg", kind) - base, 0.0)
    return ErrorBreakdown(
        ap50=base,
        delta=delta,
        counts=counts,
        background=background,
        background_delta=background_delta,
    )


def _kind(det: _Det) -> str:
    return "lookalike" if det.lookalike else "clutter"
