"""Object-free scenes: images of the built-in scenes' world that hold none of the classes, only
look-alikes, as a folder of PNG files for bootstrapping (``hardmine bootstrap --negative-images``).

A deployment's usual folder of "photos known to hold none of our classes" is, in the scenes'
world, a set of backgrounds (a muted base colour, faint gratings, thin bars in colours no class
has) with look-alikes on them: a class's colour on another silhouette (a red *disc* for the red
ring) or a class's silhouette in a colour no class has (a *purple* ring), as
``hardmine.data.scenes`` draws them. A detector trained on the scenes, where look-alikes are
rare, fires on some of them; those detections are the false positives that bootstrapping mines.

The look-alikes are drawn with the scenes' own silhouettes and colours
(``hardmine.data.scenes``); the rest is drawn here, so that the scene generator's layout can change
without changing these images' kind. Image ``i`` of a set comes from ``(seed, i)`` alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from hardmine._atomic import write_atomic
from hardmine.data.scenes import _CLASS_COLOURS, _OTHER_COLOURS, CLASS_NAMES, _shape_masks

#: Seeds of the two folders the README's experiment uses (the scenes' splits use 0 and 1).
BACKGROUND_SEEDS = {"train": 100, "val": 101}


def background_scene(
    seed: int,
    index: int,
    *,
    image_size: int = 128,
    num_classes: int = 3,
    lookalikes: tuple[int, int] = (2, 4),
    side: tuple[float, float] = (0.11, 0.5),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One object-free image with look-alikes.

    Args:
        seed: the set's seed.
        index: the image's position in the set.
        image_size: side of the square image in pixels.
        num_classes: the classes whose look-alikes appear (1 to 4, the first of ``CLASS_NAMES``).
        lookalikes: look-alikes per image, uniform over this inclusive range.
        side: their sides as fractions of the image's, log-uniform over this range.

    Returns:
        ``(image uint8 [H, W, 3], boxes float32 [D, 4], mimics int64 [D])``: the picture, the
        look-alikes' visible boxes (xyxy) and the class each resembles.
    """
    if not 1 <= num_classes <= len(CLASS_NAMES):
        raise ValueError(f"num_classes must be in [1, {len(CLASS_NAMES)}], got {num_classes}")
    rng = np.random.default_rng([seed, index])
    size, f32 = image_size, np.float32
    yy, xx = np.mgrid[0:size, 0:size].astype(f32) + 0.5
    image = _backdrop(rng, size, yy, xx)

    n = int(rng.integers(lookalikes[0], lookalikes[1] + 1))
    mimics = rng.integers(1, num_classes + 1, n)
    same_colour = rng.random(n) < 0.5
    # The scenes' convention: kind c - 1 is class c's silhouette, len(CLASS_NAMES) + c - 1 its
    # look-alike silhouette.
    kinds = np.where(same_colour, len(CLASS_NAMES) + mimics - 1, mimics - 1)
    colour = np.where(
        same_colour[:, None],
        _CLASS_COLOURS[mimics - 1],
        _OTHER_COLOURS[rng.integers(0, len(_OTHER_COLOURS), n)],
    )
    colour = (colour + rng.uniform(-0.06, 0.06, colour.shape)).clip(0, 1).astype(f32)
    sides = np.exp(rng.uniform(*np.log(np.array(side) * size), n))
    wh = np.stack([sides, sides * np.sqrt(rng.uniform(0.8, 1.25, n))], 1).astype(f32)
    centre = rng.uniform(wh / 2, size - wh / 2).astype(f32)
    u = (xx - centre[:, 0, None, None]) / (wh[:, 0, None, None] / 2)
    v = (yy - centre[:, 1, None, None]) / (wh[:, 1, None, None] / 2)
    masks = _shape_masks(kinds, u, v)  # [D, H, W]
    # Painted largest first, so that small look-alikes stay visible on top of large ones.
    top = np.full((size, size), -1)
    for k in np.argsort(-wh.prod(1), kind="stable"):
        image = np.where(masks[k][..., None], colour[k] * (1 - 0.15 * v[k])[..., None], image)
        top[masks[k]] = k
    visible = top[None] == np.arange(n)[:, None, None]  # [D, H, W]
    image = image + 0.03 * rng.standard_normal(image.shape, dtype=f32)
    seen = visible.any((1, 2))
    boxes = _boxes(visible[seen])
    return (image.clip(0, 1) * 255).round().astype(np.uint8), boxes, mimics[seen].astype(np.int64)


def _backdrop(rng: np.random.Generator, size: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """A muted base colour, three faint gratings and 1-3 thin bars in colours no class has."""
    f32 = np.float32
    image = rng.uniform(0.25, 0.6, 3).astype(f32) + np.zeros((size, size, 3), f32)
    freq = rng.uniform(0.02, 0.12, (3, 1, 1)) * 2 * np.pi
    angle = rng.uniform(0, np.pi, (3, 1, 1))
    phase = rng.uniform(0, 2 * np.pi, (3, 3))
    proj = freq * (xx * np.cos(angle) + yy * np.sin(angle))  # [3, H, W]
    waves = np.sin(proj[..., None] + phase[:, None, None, :]).sum(0)  # [H, W, 3]
    image = image + 0.05 * waves.astype(f32)
    for _ in range(int(rng.integers(1, 4))):
        cx, cy = rng.uniform(0, size, 2)
        theta = rng.uniform(0, np.pi)
        along = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
        across = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
        bar = (np.abs(along) <= rng.uniform(3, size / 5)) & (
            np.abs(across) <= rng.uniform(0.5, 1.5)
        )
        image = np.where(bar[..., None], _OTHER_COLOURS[rng.integers(0, 3)] * 0.8, image)
    return image.astype(f32)


def _boxes(masks: np.ndarray) -> np.ndarray:
    """xyxy boxes of the set pixels of ``masks: bool [D, H, W]`` (a pixel is 1 x 1)."""
    if not len(masks):
        return np.zeros((0, 4), np.float32)
    cols, rows = masks.any(1), masks.any(2)
    x1, y1 = cols.argmax(1), rows.argmax(1)
    x2 = cols.shape[1] - cols[:, ::-1].argmax(1)
    y2 = rows.shape[1] - rows[:, ::-1].argmax(1)
    return np.stack([x1, y1, x2, y2], 1).astype(np.float32)


def write_background_images(
    folder: str | Path,
    num_images: int,
    *,
    seed: int = BACKGROUND_SEEDS["train"],
    image_size: int = 128,
    num_classes: int = 3,
    lookalikes: tuple[int, int] = (2, 4),
) -> list[Path]:
    """Write ``num_images`` object-free images (``background_scene``) as ``bg_00000.png`` ... in
    ``folder`` (created); each file atomically. An existing file of the same name is replaced by
    the same picture.

    Returns:
        The files, in order.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(num_images):
        image, _, _ = background_scene(
            seed, i, image_size=image_size, num_classes=num_classes, lookalikes=lookalikes
        )
        path = folder / f"bg_{i:05d}.png"
        write_atomic(path, lambda f, image=image: Image.fromarray(image).save(f, format="PNG"))
        paths.append(path)
    return paths
