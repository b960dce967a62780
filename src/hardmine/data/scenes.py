"""Built-in scenes: procedurally generated detection images designed for measuring samplers.

Each class is a conjunction of a shape and a colour (red ring, green cross, blue triangle, yellow
diamond). A scene is mostly easy background on which the methods each find something of their
own, in known amounts (``SceneDesign``; the amounts below are the defaults at 128 px):

- **isolated objects**, 1-3 per image, apart from each other where there is room, with sides
  log-uniform from 11 % to 50 % of the image (14-64 px: COCO's small and medium ranges), and
  in 20 % of the images one **large** object (78-92 %, 100-118 px: COCO's large, area over
  96²) behind the others;
- a **crowd group** in half of the images: 2-3 overlapping instances of one class, each centre
  0.45-0.75 of a side from another member's (box IoU about 0.1-0.4 within a pair). Between them
  lie proposals that overlap two objects: the negatives that IoU-balanced sampling and the Overlap
  Sampler (IoU(p,n)) look for, and the duplicates NMS has to resolve;
- **rare look-alikes**, 0 in 70 % of the images, 1 in 25 %, 2 in 5 %: a class's colour on
  another silhouette (a red *disc* for the ring), or a class's silhouette in a colour no class has
  (a *purple* ring). They are the hard negatives that OHEM and offline mining target: among ~500
  proposals an image has a handful on a look-alike, so random sampling seldom draws one, while
  their loss is high until the detector has learnt the conjunction;
- **clutter**: 1-3 thin bars in muted colours no class has, on a smooth background with faint
  gratings: easy negatives, most of what random sampling picks.

Everything is recorded per image (``Scene``: the crowd group of each object, the look-alikes'
boxes and the classes they mimic, the clutter's boxes), so that a report can attribute false
positives to look-alikes or to clutter and count what was there (``SceneDataset.facts``).

Shapes are painted back to front, largest first, so what an annotation describes is what is
visible: boxes and masks are those of the visible pixels. An object less than half visible is an
ignore region (COCO ``iscrowd``), one wholly hidden is dropped.

Everything is generated at construction with vectorised NumPy, deterministically from the seed
(image ``i`` from ``(seed, i)``), and held in memory (about 2 ms an image at 128 px).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from faster_coco_eval.core import mask as mask_utils
from torch import Tensor
from torch.utils.data import Dataset

CLASS_NAMES = ("ring", "cross", "triangle", "diamond")
# A look-alike of class i with the class's colour has LOOKALIKE_SHAPES[i]: the same silhouette
# family with one part changed.
LOOKALIKE_SHAPES = ("disc", "saltire", "inverted_triangle", "square")
_SHAPES = CLASS_NAMES + LOOKALIKE_SHAPES
_CLASS_COLOURS = np.array(
    [[0.85, 0.15, 0.15], [0.15, 0.70, 0.20], [0.20, 0.30, 0.90], [0.90, 0.80, 0.10]],
    dtype=np.float32,
)
# Colours no class has, for look-alikes that copy a class's shape only.
_OTHER_COLOURS = np.array(
    [[0.60, 0.20, 0.70], [0.95, 0.50, 0.10], [0.10, 0.75, 0.80]], dtype=np.float32
)
#: The seed of each split: training and validation images never coincide.
SPLIT_SEEDS = {"train": 0, "val": 1}
SPLIT_SIZES = {"train": 512, "val": 256}
_MIN_VISIBLE = 0.5  # below this fraction of its in-image area an object becomes an ignore region
# COCO's size ranges, by area in pixels (``hardmine.engine.evaluate.coco_ap``'s APs / APm / APl).
_SMALL, _LARGE = 32**2, 96**2


@dataclass(frozen=True)
class SceneDesign:
    """What a scene holds and in what amounts; lengths are fractions of the image's side.

    Attributes:
        objects: isolated objects per image, uniform over this inclusive range.
        side: isolated objects' and look-alikes' sides, log-uniform over this range.
        p_large: chance that an image has one large object, side in ``large_side``.
        large_side: the large object's side.
        p_crowd: chance that an image has a crowd group.
        crowd_size: members of a crowd group, uniform over this inclusive range.
        crowd_side: the group's common side, log-uniform (each member within ±15 % of it).
        crowd_shift: a member's centre distance from another member's, as a fraction of the side.
        lookalikes: probability of 0, 1, 2, ... look-alikes in an image.
        clutter: thin bars per image, uniform over this inclusive range.
    """

    objects: tuple[int, int] = (1, 3)
    side: tuple[float, float] = (0.11, 0.5)
    p_large: float = 0.2
    large_side: tuple[float, float] = (0.78, 0.92)
    p_crowd: float = 0.5
    crowd_size: tuple[int, int] = (2, 3)
    crowd_side: tuple[float, float] = (0.18, 0.4)
    crowd_shift: tuple[float, float] = (0.45, 0.75)
    lookalikes: tuple[float, ...] = (0.7, 0.25, 0.05)
    clutter: tuple[int, int] = (1, 3)


#: The default comparison's scenes.
DEFAULT_DESIGN = SceneDesign()


@dataclass(frozen=True)
class Scene:
    """One generated image and everything known about it.

    Attributes:
        image: ``uint8 [H, W, 3]``.
        boxes: ``float32 [K, 4]`` xyxy of the visible objects.
        labels: ``int64 [K]`` in ``1..num_classes``.
        crowd: ``int64 [K]``: the object's crowd group (0, 1, ... in the image), -1 when isolated
            (the large object counts as isolated).
        instance_map: ``uint8 [H, W]``: ``k + 1`` where object ``k`` is visible, 0 elsewhere.
        ignore_boxes: ``float32 [M, 4]`` of objects less than half visible.
        ignore_labels: ``int64 [M]`` their classes.
        lookalike_boxes: ``float32 [D, 4]`` xyxy of the visible look-alikes.
        lookalike_mimics: ``int64 [D]``: the class each look-alike resembles.
        clutter_boxes: ``float32 [C, 4]`` xyxy of the clutter bars (under everything else).
    """

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    crowd: np.ndarray
    instance_map: np.ndarray
    ignore_boxes: np.ndarray
    ignore_labels: np.ndarray
    lookalike_boxes: np.ndarray
    lookalike_mimics: np.ndarray
    clutter_boxes: np.ndarray


def _shape_masks(kinds: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Silhouettes in box-normalised coordinates.

    Args:
        kinds: ``int [S]`` indices into ``_SHAPES``.
        u: ``float32 [S, H, W]`` horizontal position in each shape's box, -1 to 1.
        v: ``float32 [S, H, W]`` vertical position, -1 (top) to 1.

    Returns:
        ``bool [S, H, W]``.
    """
    au, av = np.abs(u), np.abs(v)
    inside = (au <= 1) & (av <= 1)
    out = np.zeros(u.shape, dtype=bool)
    for kind, name in enumerate(_SHAPES):
        sel = kinds == kind
        if not sel.any():
            continue
        su, sv, sau, sav = u[sel], v[sel], au[sel], av[sel]
        if name in ("ring", "disc"):
            r2 = su * su + sv * sv
            m = (r2 <= 1) & (r2 >= 0.55**2) if name == "ring" else r2 <= 1
        elif name == "cross":
            m = (sau <= 0.3) | (sav <= 0.3)
        elif name == "saltire":
            m = (np.abs(su + sv) <= 0.42) | (np.abs(su - sv) <= 0.42)
        elif name == "triangle":
            m = sau <= (sv + 1) / 2
        elif name == "inverted_triangle":
            m = sau <= (1 - sv) / 2
        elif name == "diamond":
            m = sau + sav <= 1
        else:
            m = np.ones(su.shape, dtype=bool)
        out[sel] = m & inside[sel]
    return out


def _tight_boxes(masks: np.ndarray) -> np.ndarray:
    """Boxes of the set pixels of ``masks: bool [S, H, W]`` -> ``float32 [S, 4]`` xyxy.

    A pixel ``(y, x)`` covers ``[x, x + 1) × [y, y + 1)``, so a one-pixel mask has a 1 × 1 box.
    Rows of empty masks are meaningless.
    """
    cols, rows = masks.any(1), masks.any(2)  # [S, W], [S, H]
    w, h = cols.shape[1], rows.shape[1]
    x1, y1 = cols.argmax(1), rows.argmax(1)
    x2, y2 = w - cols[:, ::-1].argmax(1), h - rows[:, ::-1].argmax(1)
    return np.stack([x1, y1, x2, y2], axis=1).astype(np.float32)


def _background(
    rng: np.random.Generator, size: int, yy: np.ndarray, xx: np.ndarray, num_bars: int
) -> tuple[np.ndarray, np.ndarray]:
    """A smooth muted background with faint gratings and ``num_bars`` thin clutter bars.

    Returns:
        ``float32 [H, W, 3]`` and the bars' boxes ``float32 [num_bars, 4]`` xyxy.
    """
    f32 = np.float32
    base = rng.uniform(0.3, 0.6) + rng.uniform(-0.05, 0.05, size=3).astype(f32)
    freq = (rng.uniform(0.02, 0.08, size=(2, 1, 1)) * 2 * np.pi).astype(f32)
    angle = rng.uniform(0, np.pi, size=(2, 1, 1)).astype(f32)
    phase = rng.uniform(0, 2 * np.pi, size=(2, 3)).astype(f32)  # [grating, channel]
    proj = freq * (xx * np.cos(angle) + yy * np.sin(angle))  # [2, H, W]
    waves = np.sin(proj[..., None] + phase[:, None, None, :]).sum(0)  # [H, W, 3]
    img = (base + 0.03 * waves).astype(f32)

    # Clutter: thin bars in greys and browns, colours no class has.
    cx, cy = rng.uniform(0, size, (2, num_bars, 1, 1)).astype(f32)
    theta = rng.uniform(0, np.pi, (num_bars, 1, 1)).astype(f32)
    half_len = rng.uniform(0.05, 0.2, (num_bars, 1, 1)).astype(f32) * size
    half_wid = rng.uniform(0.6, 1.5, (num_bars, 1, 1)).astype(f32)
    a = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    b = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
    bars = (np.abs(a) <= half_len) & (np.abs(b) <= half_wid)  # [B, H, W]
    grey = rng.uniform(0.15, 0.85, (num_bars, 1))
    tint = rng.uniform([0.0, -0.05, -0.12], [0.05, 0.0, -0.02], (num_bars, 3))  # grey to brown
    colours = (grey + tint).clip(0, 1).astype(f32)
    top = np.where(bars, np.arange(1, num_bars + 1)[:, None, None], 0).max(0)  # [H, W]
    seen = bars.any((1, 2))
    boxes = _tight_boxes(bars[seen]) if seen.any() else np.zeros((0, 4), np.float32)
    return np.where(top[..., None] > 0, colours[top - 1], img), boxes


def _box(centre: np.ndarray, wh: np.ndarray) -> np.ndarray:
    return np.concatenate([centre - wh / 2, centre + wh / 2], axis=-1)


def _overlap(box: np.ndarray, others: list[np.ndarray]) -> float:
    """The largest IoU of ``box: [4]`` with ``others``, 0 without any."""
    if not others:
        return 0.0
    o = np.stack(others)
    wh = (np.minimum(box[2:], o[:, 2:]) - np.maximum(box[:2], o[:, :2])).clip(min=0)
    inter = wh.prod(1)
    union = (box[2:] - box[:2]).prod() + (o[:, 2:] - o[:, :2]).prod(1) - inter
    return float((inter / union).max())


def _free_spot(
    rng: np.random.Generator, wh: np.ndarray, placed: list[np.ndarray], size: int
) -> np.ndarray:
    """A centre that keeps a ``wh`` box inside the image and off the ``placed`` boxes (the best of
    16 uniform tries: the first with no overlap, else the least overlapping)."""
    low, high = wh / 2, np.maximum(size - wh / 2, wh / 2)
    tries = rng.uniform(low, high, (16, 2))
    overlaps = [_overlap(_box(c, wh), placed) for c in tries]
    return tries[int(np.argmin(overlaps))]


def _sides(rng: np.random.Generator, n: int, low: float, high: float) -> np.ndarray:
    """``n`` boxes' ``(w, h)``: side log-uniform in ``[low, high]``, aspect ratio 0.8-1.25."""
    side = np.exp(rng.uniform(np.log(low), np.log(high), n))
    aspect = np.sqrt(np.exp(rng.uniform(np.log(0.8), np.log(1.25), n)))
    return np.stack([side * aspect, side / aspect], axis=1)


def generate_scene(
    seed: int,
    index: int,
    *,
    image_size: int,
    num_classes: int,
    design: SceneDesign = DEFAULT_DESIGN,
) -> Scene:
    """Generate image ``index`` of the scene set with ``seed``, independently of the others.

    Args:
        seed: the set's seed.
        index: the image's position in the set.
        image_size: side of the square image in pixels.
        num_classes: how many of ``CLASS_NAMES`` appear, 1 to 4.
        design: what the scene holds, in what amounts.

    Returns:
        The ``Scene``.
    """
    rng = np.random.default_rng([seed, index])
    size = image_size
    d = design
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5  # pixel centres, [H, W] each
    background, clutter_boxes = _background(
        rng, size, yy, xx, int(rng.integers(d.clutter[0], d.clutter[1] + 1))
    )

    # Objects: (centre, wh, label, crowd group) in placement order; `placed` holds the boxes
    # that later shapes keep off. The large object is not among them: the rest lie on top of it.
    centres, whs, labels, crowd = [], [], [], []
    placed: list[np.ndarray] = []
    if rng.random() < d.p_large:
        wh = _sides(rng, 1, *(s * size for s in d.large_side))[0].clip(max=0.95 * size)
        centres.append(size / 2 + rng.uniform(-0.04, 0.04, 2) * size)
        whs.append(wh)
        labels.append(int(rng.integers(1, num_classes + 1)))
        crowd.append(-1)
    if rng.random() < d.p_crowd:
        members = int(rng.integers(d.crowd_size[0], d.crowd_size[1] + 1))
        side = np.exp(rng.uniform(*np.log(np.array(d.crowd_side) * size)))
        label = int(rng.integers(1, num_classes + 1))
        group_wh = _sides(rng, members, side * 0.85, side * 1.15)
        # The group's centre leaves room for the members around it.
        group_c = [_free_spot(rng, group_wh[0] * 2, placed, size)]
        for m in range(1, members):
            anchor = group_c[int(rng.integers(0, m))]
            angle = rng.uniform(0, 2 * np.pi)
            shift = rng.uniform(*d.crowd_shift) * side
            c = anchor + shift * np.array([np.cos(angle), np.sin(angle)])
            group_c.append(c.clip(group_wh[m] / 2, size - group_wh[m] / 2))
        for c, wh in zip(group_c, group_wh, strict=True):
            centres.append(c)
            whs.append(wh)
            labels.append(label)
            crowd.append(0)
            placed.append(_box(c, wh))
    num_isolated = int(rng.integers(d.objects[0], d.objects[1] + 1))
    for wh in _sides(rng, num_isolated, *(s * size for s in d.side)):
        c = _free_spot(rng, wh, placed, size)
        centres.append(c)
        whs.append(wh)
        labels.append(int(rng.integers(1, num_classes + 1)))
        crowd.append(-1)
        placed.append(_box(c, wh))
    num_obj = len(labels)

    # Look-alikes: half keep the class's colour and change the silhouette, half keep the
    # silhouette in a colour no class has.
    num_look = int(rng.choice(len(d.lookalikes), p=np.array(d.lookalikes) / sum(d.lookalikes)))
    mimics = rng.integers(1, num_classes + 1, num_look)
    same_colour = rng.random(num_look) < 0.5
    look_kinds = np.where(same_colour, len(CLASS_NAMES) + mimics - 1, mimics - 1)
    look_colour = np.where(
        same_colour[:, None],
        _CLASS_COLOURS[mimics - 1],
        _OTHER_COLOURS[rng.integers(0, len(_OTHER_COLOURS), num_look)],
    )
    for wh in _sides(rng, num_look, *(s * size for s in d.side)):
        c = _free_spot(rng, wh, placed, size)
        centres.append(c)
        whs.append(wh)
        placed.append(_box(c, wh))

    labels_a = np.array(labels, dtype=np.int64)
    kinds = np.concatenate([labels_a - 1, look_kinds]).astype(np.int64)  # objects, look-alikes
    centre = np.array(centres, dtype=np.float32).reshape(-1, 2)
    wh = np.array(whs, dtype=np.float32).reshape(-1, 2)
    colour = np.concatenate([_CLASS_COLOURS[labels_a - 1], look_colour]).reshape(-1, 3)
    colour = (colour + rng.uniform(-0.06, 0.06, colour.shape)).clip(0, 1).astype(np.float32)

    u = (xx - centre[:, 0, None, None]) / (wh[:, 0, None, None] / 2)  # [S, H, W]
    v = (yy - centre[:, 1, None, None]) / (wh[:, 1, None, None] / 2)
    masks = _shape_masks(kinds, u, v)

    # Painter's order, largest at the back, so small shapes stay visible on top of large ones.
    depth = np.empty(len(kinds), dtype=np.int64)
    depth[np.argsort(-wh.prod(1), kind="stable")] = np.arange(1, len(kinds) + 1)
    top = np.where(masks, depth[:, None, None], 0).max(0) if len(kinds) else np.zeros_like(xx)
    top = top.astype(np.int64)
    owner = np.argsort(depth)  # shape painted at each depth, minus one
    image = background
    if len(kinds):
        top_shape = owner[np.maximum(top, 1) - 1]
        # Vertical shading makes surfaces less flat without changing their hue.
        shade = 1 - 0.15 * np.take_along_axis(v, top_shape[None], 0)[0]
        image = np.where(
            top[..., None] > 0, colour[top_shape] * shade[..., None].clip(0.8, 1.2), background
        )
    image = image + 0.03 * rng.standard_normal(image.shape, dtype=np.float32)
    image_u8 = (image.clip(0, 1) * 255).round().astype(np.uint8)

    visible = (top[None] == depth[:, None, None]) & masks  # [S, H, W]
    vis_area = visible.sum((1, 2))
    full_area = masks.sum((1, 2))
    vis_boxes = _tight_boxes(visible)
    full_boxes = _tight_boxes(masks)

    obj_vis, obj_full = vis_area[:num_obj], full_area[:num_obj]
    keep = (obj_vis > 0) & (obj_vis >= _MIN_VISIBLE * obj_full)
    ignore = (obj_vis > 0) & ~keep
    kept = np.flatnonzero(keep)
    instance_map = np.zeros((size, size), dtype=np.uint8)
    for k, s in enumerate(kept):
        instance_map[visible[s]] = k + 1
    # A crowd group is a group while two of its members are still objects.
    crowd_a = np.array(crowd, dtype=np.int64)[kept]
    if (crowd_a == 0).sum() < 2:
        crowd_a[:] = -1
    look_seen = vis_area[num_obj:] > 0
    return Scene(
        image=image_u8,
        boxes=vis_boxes[kept].reshape(-1, 4),
        labels=labels_a[kept],
        crowd=crowd_a,
        instance_map=instance_map,
        ignore_boxes=full_boxes[:num_obj][ignore].reshape(-1, 4),
        ignore_labels=labels_a[ignore],
        lookalike_boxes=vis_boxes[num_obj:][look_seen].reshape(-1, 4),
        lookalike_mimics=mimics[look_seen].astype(np.int64),
        clutter_boxes=clutter_boxes,
    )


def _rle(mask: np.ndarray) -> dict:
    """COCO compressed RLE of ``mask: bool [H, W]``, with ``counts`` as ``str`` (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _coco_gt(scenes: list[Scene], categories: list[str]) -> dict:
    """COCO instances dict of ``scenes``; image ids are ``index + 1``, category ids the labels.

    ``area`` is the box area rather than the mask's, so that AP by size (small / medium / large)
    sorts objects by the size of their boxes, the thing a box detector is judged on.
    """
    images, annotations = [], []

    def annotate(
        image_id: int, box: list[float], label: int, crowd: bool, mask: np.ndarray
    ) -> None:
        x1, y1, x2, y2 = box
        annotations.append(
            {
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": label,
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": (x2 - x1) * (y2 - y1),
                "iscrowd": int(crowd),
                "segmentation": _rle(mask),
            }
        )

    for index, scene in enumerate(scenes):
        image_id = index + 1
        h, w = scene.instance_map.shape
        images.append({"id": image_id, "file_name": f"{index:06d}.png", "width": w, "height": h})
        for k, (box, label) in enumerate(
            zip(scene.boxes.tolist(), scene.labels.tolist(), strict=True)
        ):
            annotate(image_id, box, label, False, scene.instance_map == k + 1)
        for box, label in zip(
            scene.ignore_boxes.tolist(), scene.ignore_labels.tolist(), strict=True
        ):
            region = np.zeros((h, w), dtype=bool)
            region[int(box[1]) : int(box[3]), int(box[0]) : int(box[2])] = True
            annotate(image_id, box, label, True, region)
    cats = [
        {"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(categories)
    ]
    return {"images": images, "annotations": annotations, "categories": cats}


class SceneDataset(Dataset[tuple[Tensor, dict[str, Tensor | int]]]):
    """Generated scenes in the common dataset interface (see ``hardmine.data``).

    Items are ``(image, target)``: ``image`` ``float32 [3, H, W]`` in [0, 1]; ``target`` with
    ``boxes`` ``float32 [K, 4]`` xyxy, ``labels`` ``int64 [K]``, ``image_id`` (``index + 1``),
    ``ignore_boxes`` ``float32 [M, 4]`` and, with masks, ``masks`` ``uint8 [K, H, W]``.

    Args:
        num_images: how many images.
        seed: determines every pixel and box; image ``i`` depends only on ``(seed, i)``.
        image_size: side of the square images in pixels.
        num_classes: how many of ``CLASS_NAMES`` (ring, cross, triangle, diamond) are classes.
        with_masks: include instance masks (of the visible pixels) in targets.
        design: what each scene holds, in what amounts.
    """

    def __init__(
        self,
        num_images: int,
        *,
        seed: int,
        image_size: int = 128,
        num_classes: int = 3,
        with_masks: bool = False,
        design: SceneDesign = DEFAULT_DESIGN,
    ) -> None:
        if not 1 <= num_classes <= len(CLASS_NAMES):
            raise ValueError(f"num_classes must be in 1..{len(CLASS_NAMES)}, got {num_classes}")
        if image_size < 32:
            raise ValueError(f"image_size must be at least 32, got {image_size}")
        self.with_masks = with_masks
        self.design = design
        self.categories: list[str] = list(CLASS_NAMES[:num_classes])
        self.scenes: list[Scene] = [
            generate_scene(seed, i, image_size=image_size, num_classes=num_classes, design=design)
            for i in range(num_images)
        ]
        self.coco_gt: dict = _coco_gt(self.scenes, self.categories)

    def facts(self) -> dict[str, int]:
        """What the scenes hold, counted: the amounts each method has to act on.

        Returns:
            ``images``; ``objects`` (not ignored) and of them ``small`` / ``medium`` / ``large``
            (COCO's ranges of box area: under 32², under 96², above); ``ignored`` (less than half
            visible); ``crowd_groups`` and ``crowded_objects`` (objects in one);
            ``images_with_lookalikes`` and ``lookalikes``; ``clutter`` (bars).
        """
        objects = [s.boxes for s in self.scenes]
        areas = np.concatenate([(b[:, 2:] - b[:, :2]).prod(1) for b in objects] or [np.zeros(0)])
        return {
            "images": len(self.scenes),
            "objects": int(areas.size),
            "small": int((areas < _SMALL).sum()),
            "medium": int(((areas >= _SMALL) & (areas < _LARGE)).sum()),
            "large": int((areas >= _LARGE).sum()),
            "ignored": sum(len(s.ignore_boxes) for s in self.scenes),
            "crowd_groups": sum(len(set(s.crowd[s.crowd >= 0].tolist())) for s in self.scenes),
            "crowded_objects": sum(int((s.crowd >= 0).sum()) for s in self.scenes),
            "images_with_lookalikes": sum(len(s.lookalike_boxes) > 0 for s in self.scenes),
            "lookalikes": sum(len(s.lookalike_boxes) for s in self.scenes),
            "clutter": sum(len(s.clutter_boxes) for s in self.scenes),
        }

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor | int]]:
        scene = self.scenes[index]
        image = torch.from_numpy(scene.image).permute(2, 0, 1).float().div_(255)
        # Copies, so that in-place transforms downstream cannot alter the cached scene.
        target: dict[str, Tensor | int] = {
            "boxes": torch.tensor(scene.boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(scene.labels, dtype=torch.int64),
            "image_id": index + 1,
            "ignore_boxes": torch.tensor(scene.ignore_boxes, dtype=torch.float32).reshape(-1, 4),
        }
        if self.with_masks:
            ids = torch.arange(1, len(scene.labels) + 1, dtype=torch.uint8)
            instance_map = torch.from_numpy(scene.instance_map)
            target["masks"] = (instance_map[None] == ids[:, None, None]).to(torch.uint8)
        return image, target


@functools.lru_cache(maxsize=8)
def make_scenes(
    split: Literal["train", "val"],
    *,
    num_images: int | None = None,
    image_size: int = 128,
    num_classes: int = 3,
    with_masks: bool = False,
) -> SceneDataset:
    """The scene set of a split: ``"train"`` (seed 0, 512 images by default) or ``"val"`` (seed 1,
    256 images by default), of the default design.

    Cached: the same arguments return the same dataset object.

    Args:
        split: which set.
        num_images: how many images; the split's default size when None.
        image_size: side of the square images in pixels.
        num_classes: how many classes, 1 to 4.
        with_masks: include instance masks in targets.

    Returns:
        The ``SceneDataset``.
    """
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_SEEDS)}, got {split!r}")
    return SceneDataset(
        SPLIT_SIZES[split] if num_images is None else num_images,
        seed=SPLIT_SEEDS[split],
        image_size=image_size,
        num_classes=num_classes,
        with_masks=with_masks,
    )
