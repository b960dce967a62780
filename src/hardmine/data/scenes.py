"""Built-in scenes: procedurally generated detection images where sample selection matters.

Each class is a conjunction of a shape and a colour (red ring, green cross, blue triangle, yellow
diamond). Every image also holds look-alike distractors that share one of the two with a class and
not the other: a red *disc* or a *cyan* ring is not a ring object. They are the hard negatives that
OHEM and the overlap sampler are meant to find; random sampling mostly sees the textured clutter
background (gratings and thin bars, some in the class colours). Objects are placed in overlapping
clusters (the cases NMS gets wrong) and their sizes span COCO's small, medium and large ranges.

Shapes are painted back to front, largest first, so what an annotation describes is what is
visible: boxes and masks are those of the visible pixels. An object less than half visible is an
ignore region (COCO ``iscrowd``), one wholly hidden is dropped.

Everything is generated at construction with vectorised NumPy, deterministically from the seed
(image ``i`` from ``(seed, i)``), and held in memory.
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
# A look-alike of class i has LOOKALIKE_SHAPES[i]: the same silhouette class with one part changed.
_LOOKALIKE_SHAPES = ("disc", "saltire", "inverted_triangle", "square")
_SHAPES = CLASS_NAMES + _LOOKALIKE_SHAPES
_CLASS_COLOURS = np.array(
    [[0.85, 0.15, 0.15], [0.15, 0.70, 0.20], [0.20, 0.30, 0.90], [0.90, 0.80, 0.10]],
    dtype=np.float32,
)
# Colours no class has, for distractors that copy a class's shape only.
_OTHER_COLOURS = np.array(
    [[0.60, 0.20, 0.70], [0.95, 0.50, 0.10], [0.10, 0.75, 0.80]], dtype=np.float32
)
#: The seed of each split: training and validation images never coincide.
SPLIT_SEEDS = {"train": 0, "val": 1}
_SPLIT_SIZES = {"train": 256, "val": 64}
_P_LARGE = 0.25  # chance that an image has one large object
_MIN_VISIBLE = 0.5  # below this fraction of its in-image area an object becomes an ignore region


@dataclass(frozen=True)
class Scene:
    """One generated image and everything known about it.

    Attributes:
        image: ``uint8 [H, W, 3]``.
        boxes: ``float32 [K, 4]`` xyxy of the visible objects.
        labels: ``int64 [K]`` in ``1..num_classes``.
        instance_map: ``uint8 [H, W]``: ``k + 1`` where object ``k`` is visible, 0 elsewhere.
        ignore_boxes: ``float32 [M, 4]`` of objects less than half visible.
        ignore_labels: ``int64 [M]`` their classes.
        distractor_boxes: ``float32 [D, 4]`` xyxy of the visible look-alikes.
        distractor_mimics: ``int64 [D]``: the class each look-alike resembles.
    """

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    instance_map: np.ndarray
    ignore_boxes: np.ndarray
    ignore_labels: np.ndarray
    distractor_boxes: np.ndarray
    distractor_mimics: np.ndarray


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


def _background(rng: np.random.Generator, size: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Muted base colour, low-frequency gratings and thin bars -> ``float32 [H, W, 3]``."""
    f32 = np.float32
    base = rng.uniform(0.25, 0.6, size=3).astype(f32)
    freq = (rng.uniform(0.02, 0.12, size=(3, 1, 1)) * 2 * np.pi).astype(f32)
    angle = rng.uniform(0, np.pi, size=(3, 1, 1)).astype(f32)
    phase = rng.uniform(0, 2 * np.pi, size=(3, 3)).astype(f32)  # [grating, channel]
    proj = freq * (xx * np.cos(angle) + yy * np.sin(angle))  # [3, H, W]
    waves = np.sin(proj[..., None] + phase[:, None, None, :]).sum(0)  # [H, W, 3]
    img = base + 0.05 * waves

    # Thin bars, half of them in class colours: clutter that shares colour with the objects.
    nb = int(rng.integers(6, 15))
    cx, cy = rng.uniform(0, size, (2, nb, 1, 1)).astype(f32)
    theta = rng.uniform(0, np.pi, (nb, 1, 1)).astype(f32)
    half_len = rng.uniform(3, size / 5, (nb, 1, 1)).astype(f32)
    half_wid = rng.uniform(0.5, 1.5, (nb, 1, 1)).astype(f32)
    a = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    b = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
    bars = (np.abs(a) <= half_len) & (np.abs(b) <= half_wid)  # [B, H, W]
    colours = np.where(
        rng.random((nb, 1)) < 0.5,
        _CLASS_COLOURS[rng.integers(0, len(_CLASS_COLOURS), nb)],
        rng.uniform(0.1, 0.9, (nb, 3)),
    ).astype(np.float32)
    top = np.where(bars, np.arange(1, nb + 1)[:, None, None], 0).max(0)  # [H, W], 0 = none
    return np.where(top[..., None] > 0, colours[top - 1], img)


def _place(
    rng: np.random.Generator, n: int, size: int, anchors: np.ndarray, p_cluster: float
) -> tuple[np.ndarray, np.ndarray]:
    """Centres and sizes of ``n`` shapes -> ``float32 [n, 2]`` (cx, cy) and ``[n, 2]`` (w, h).

    Sides are log-uniform from 8 px to 0.8 of the image, so COCO's small (< 32²), medium and large
    (> 96²) areas all occur at 128 px and up. With probability ``p_cluster`` a shape is put over
    one of ``anchors: [A, 4]`` (cx, cy, w, h), displaced by 0.2-0.7 of that shape's size, so it
    overlaps it.
    """
    side = np.exp(rng.uniform(np.log(8), np.log(0.8 * size), n))
    aspect = np.sqrt(rng.uniform(0.75, 1.33, n))
    wh = np.stack([side * aspect, side / aspect], axis=1).clip(max=0.9 * size)
    centre = rng.uniform(0, size, (n, 2))
    if len(anchors):
        near = rng.random(n) < p_cluster
        pick = anchors[rng.integers(0, len(anchors), n)]
        direction = rng.uniform(0, 2 * np.pi, n)
        shift = rng.uniform(0.2, 0.7, (n, 1)) * pick[:, 2:]
        offset = np.stack([np.cos(direction), np.sin(direction)], axis=1) * shift
        centre = np.where(near[:, None], (pick[:, :2] + offset).clip(0, size), centre)
    return centre.astype(np.float32), wh.astype(np.float32)


def generate_scene(seed: int, index: int, *, image_size: int, num_classes: int) -> Scene:
    """Generate image ``index`` of the scene set with ``seed``, independently of the others.

    Args:
        seed: the set's seed.
        index: the image's position in the set.
        image_size: side of the square image in pixels.
        num_classes: how many of ``CLASS_NAMES`` appear, 1 to 4.

    Returns:
        The ``Scene``.
    """
    rng = np.random.default_rng([seed, index])
    size = image_size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5  # pixel centres, [H, W] each
    background = _background(rng, size, yy, xx)

    num_obj = int(rng.integers(1, 7))
    num_dis = int(rng.integers(3, 11))
    labels = rng.integers(1, num_classes + 1, num_obj)
    obj_c, obj_wh = _place(rng, num_obj, size, np.empty((0, 4)), 0.0)
    # Uniform placement almost never fits a box over 96 × 96 px (COCO's "large") in the image,
    # so some images get one near the middle on purpose.
    if rng.random() < _P_LARGE:
        obj_wh[0] = rng.uniform(0.78, 0.9) * size * np.sqrt(rng.uniform(0.9, 1.1, 2))
        obj_c[0] = size / 2 + rng.uniform(-0.05, 0.05, 2) * size
    # Objects cluster on each other in sequence, so a cluster can hold more than two.
    for i in range(1, num_obj):
        c, wh = _place(rng, 1, size, np.concatenate([obj_c[:i], obj_wh[:i]], axis=1), 0.5)
        obj_c[i], obj_wh[i] = c[0], wh[0]
    dis_c, dis_wh = _place(rng, num_dis, size, np.concatenate([obj_c, obj_wh], axis=1), 0.4)

    # A look-alike keeps the class colour and changes the silhouette, or keeps the silhouette and
    # takes another class's colour (or one no class has).
    mimics = rng.integers(1, num_classes + 1, num_dis)
    same_colour = rng.random(num_dis) < 0.5
    dis_kinds = np.where(same_colour, len(CLASS_NAMES) + mimics - 1, mimics - 1)
    shift = rng.integers(1, num_classes, num_dis) if num_classes > 1 else np.zeros(num_dis, int)
    other = (mimics - 1 + shift) % num_classes
    use_other_class = rng.random(num_dis) < 0.6 if num_classes > 1 else np.zeros(num_dis, bool)
    dis_colour = np.where(
        same_colour[:, None],
        _CLASS_COLOURS[mimics - 1],
        np.where(
            use_other_class[:, None],
            _CLASS_COLOURS[other],
            _OTHER_COLOURS[rng.integers(0, len(_OTHER_COLOURS), num_dis)],
        ),
    )

    kinds = np.concatenate([labels - 1, dis_kinds])  # [S]; objects first, then distractors
    centre = np.concatenate([obj_c, dis_c])
    wh = np.concatenate([obj_wh, dis_wh])
    colour = np.concatenate([_CLASS_COLOURS[labels - 1], dis_colour])
    colour = (colour + rng.uniform(-0.06, 0.06, colour.shape)).clip(0, 1).astype(np.float32)

    u = (xx - centre[:, 0, None, None]) / (wh[:, 0, None, None] / 2)  # [S, H, W]
    v = (yy - centre[:, 1, None, None]) / (wh[:, 1, None, None] / 2)
    masks = _shape_masks(kinds, u, v)

    # Painter's order, largest at the back, so small shapes stay visible on top of large ones.
    depth = np.empty(len(kinds), dtype=np.int64)
    depth[np.argsort(-wh.prod(1), kind="stable")] = np.arange(1, len(kinds) + 1)
    top = np.where(masks, depth[:, None, None], 0).max(0)  # [H, W], 0 = background
    owner = np.argsort(depth)  # shape painted at each depth, minus one
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
    dis_seen = vis_area[num_obj:] > 0
    return Scene(
        image=image_u8,
        boxes=vis_boxes[kept],
        labels=labels[kept].astype(np.int64),
        instance_map=instance_map,
        ignore_boxes=full_boxes[:num_obj][ignore],
        ignore_labels=labels[ignore].astype(np.int64),
        distractor_boxes=vis_boxes[num_obj:][dis_seen],
        distractor_mimics=mimics[dis_seen].astype(np.int64),
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
    """

    def __init__(
        self,
        num_images: int,
        *,
        seed: int,
        image_size: int = 128,
        num_classes: int = 3,
        with_masks: bool = False,
    ) -> None:
        if not 1 <= num_classes <= len(CLASS_NAMES):
            raise ValueError(f"num_classes must be in 1..{len(CLASS_NAMES)}, got {num_classes}")
        if image_size < 32:
            raise ValueError(f"image_size must be at least 32, got {image_size}")
        self.with_masks = with_masks
        self.categories: list[str] = list(CLASS_NAMES[:num_classes])
        self.scenes: list[Scene] = [
            generate_scene(seed, i, image_size=image_size, num_classes=num_classes)
            for i in range(num_images)
        ]
        self.coco_gt: dict = _coco_gt(self.scenes, self.categories)

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
    """The scene set of a split: ``"train"`` (seed 0, 256 images by default) or ``"val"`` (seed 1,
    64 images by default).

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
        _SPLIT_SIZES[split] if num_images is None else num_images,
        seed=SPLIT_SEEDS[split],
        image_size=image_size,
        num_classes=num_classes,
        with_masks=with_masks,
    )
