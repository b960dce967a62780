"""Image and mask files decoded faithfully, or refused by name; and checked before work starts.

``read_image`` gives ``float32 [3, H, W]`` in [0, 1] of any file Pillow reads:

- **EXIF orientation** is applied (``PIL.ImageOps.exif_transpose``), as detectron2 and mmcv
  apply it: a photo's boxes are drawn on the image as viewers show it, and ``H, W`` are the
  oriented ones.
- **8-bit** modes (``1``, ``L``, ``P``, ``RGB``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``) become
  RGB by Pillow's conversion (CMYK without an ICC profile, as every reader does), divided by 255.
- **16-bit grayscale** (``I;16*``, and PNG's 16-bit grayscale read as ``I``) is divided by 65535,
  the full range of its type, repeated in three channels (converting it to 8-bit RGB, as Pillow
  does, clips it to two grey levels).
- **32-bit float** grayscale (``F``) is taken as it is when every pixel is finite and in [0, 1].
- **Transparency** (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa`` / ``La``, and a palette or
  colour key with a transparent entry) is composited over ``TRANSPARENT_BACKGROUND``: the
  ImageNet mean that torchvision's detectors normalise by, so that a transparent pixel reaches
  the network as 0, as the padding between batched images does.
- Anything else (32-bit integer pixels outside PNG, whose range no file states; floats outside
  [0, 1]; a mode this list does not name) raises ``ImageFileError`` naming the file.

Of a file with several frames (an animated GIF, a multi-page TIFF, a camera's MPO JPEG) the first
frame is read, as every detection library reads it.

A file missing its last bytes is refused: Pillow raises on a truncated JPEG and on truncated
pixel data, and a PNG must end with its complete ``IEND`` chunk.

``check_files`` decodes files fully in threads before training starts (Pillow's decoders release
the GIL), and remembers what it found in memory and in a small JSON file per dataset under
``cache_dir()`` (``$HARDMINE_CACHE_DIR``, else ``$XDG_CACHE_HOME/hardmine``, else
``~/.cache/hardmine``; never in the data's folder), keyed by path, size and modification time,
so that a second run checks only files that changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from torch import Tensor
from torchvision.transforms.functional import pil_to_tensor

from hardmine._atomic import write_atomic

#: RGB in [0, 1] that transparent pixels are composited over: torchvision detectors' image mean.
TRANSPARENT_BACKGROUND = (0.485, 0.456, 0.406)

_GRAY16 = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_EIGHT_BIT = frozenset({"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})
_ALPHA = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
#: Mask modes: one integer channel per pixel.
_MASK_MODES = frozenset({"1", "L", "P", "I", *_GRAY16})
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk: length 0, type, CRC
# EXIF orientations that turn the image by 90 degrees (width and height swap).
_TRANSPOSED = frozenset({5, 6, 7, 8})

Kind = Literal["image", "mask"]


class ImageFileError(ValueError):
    """An image or mask file that cannot be decoded faithfully; the message names the file."""


# --- decoding -------------------------------------------------------------------------------


def _open(path: Path) -> tuple[Image.Image, str | None]:
    """The fully decoded image, EXIF orientation applied, and its file format.

    Raises:
        ImageFileError: the file is missing, unreadable or truncated.
    """
    try:
        with Image.open(path) as im:
            im.load()
            if im.format == "PNG":
                _check_png_end(path)
            return ImageOps.exif_transpose(im), im.format
    except ImageFileError:
        raise
    except FileNotFoundError:
        raise ImageFileError(f"{path}: file not found") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
        raise ImageFileError(f"{path}: cannot be decoded: {error}") from None


def _check_png_end(path: Path) -> None:
    size = path.stat().st_size
    with path.open("rb") as f:
        f.seek(max(0, size - len(_PNG_END)))
        if f.read() != _PNG_END:
            raise ImageFileError(f"{path}: truncated PNG file (it does not end with IEND)")


def _orientation(im: Image.Image) -> int:
    value = im.getexif().get(ExifTags.Base.Orientation, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _gray(values: np.ndarray) -> Tensor:
    """``float32 [H, W]`` -> ``[3, H, W]`` (its own memory, as every image this module gives)."""
    return torch.from_numpy(np.array(values, dtype=np.float32)).expand(3, -1, -1).contiguous()


def _composite(im: Image.Image) -> Tensor:
    """An image with transparency over ``TRANSPARENT_BACKGROUND``: ``float32 [3, H, W]``."""
    background = torch.tensor(TRANSPARENT_BACKGROUND, dtype=torch.float32)[:, None, None]
    if im.mode == "La":  # premultiplied: the grey already carries its alpha
        la = pil_to_tensor(im).float().div_(255)
        return la[:1] + (1 - la[1:]) * background  # broadcast to [3, H, W]
    rgba = pil_to_tensor(im.convert("RGBA")).float().div_(255)
    alpha = rgba[3:]
    return rgba[:3] * alpha + (1 - alpha) * background


def _rule(im: Image.Image, path: Path, file_format: str | None) -> str:
    """Which of the module docstring's rules decodes ``im``: ``"gray16"``, ``"float"``,
    ``"alpha"`` or ``"rgb"``.

    Raises:
        ImageFileError: the image cannot be converted faithfully.
    """
    mode = im.mode
    if mode in _GRAY16 or (mode == "I" and file_format == "PNG"):
        # PNG's greyscale is at most 16 bits: Pillow reads it as I;16, or as I in older versions.
        return "gray16"
    if mode == "F":
        values = np.asarray(im)
        if values.size and not (
            np.isfinite(values).all() and 0 <= values.min() <= values.max() <= 1
        ):
            raise ImageFileError(
                f"{path}: 32-bit float pixels outside [0, 1] (from {values.min()} to "
                f"{values.max()}); scale them to [0, 1] or save as 8- or 16-bit"
            )
        return "float"
    if mode in _ALPHA or (mode in _EIGHT_BIT and im.has_transparency_data):
        return "alpha"
    if mode in _EIGHT_BIT:
        return "rgb"
    if mode == "I":
        raise ImageFileError(
            f"{path}: 32-bit integer pixels (PIL mode 'I') have no stated range; save the image "
            "as 8-bit RGB or 16-bit greyscale PNG"
        )
    raise ImageFileError(f"{path}: PIL mode {mode!r} is not supported; save the image as 8-bit RGB")


def _to_tensor(im: Image.Image, path: Path, file_format: str | None) -> Tensor:
    rule = _rule(im, path, file_format)
    if rule == "gray16":
        return _gray(np.asarray(im).astype(np.float32) / 65535)
    if rule == "float":
        return _gray(np.asarray(im))
    if rule == "alpha":
        return _composite(im)
    return pil_to_tensor(im if im.mode == "RGB" else im.convert("RGB")).float().div_(255)


def read_image(path: str | Path) -> Tensor:
    """An image file as ``float32 [3, H, W]`` in [0, 1], decoded as the module docstring says.

    Raises:
        ImageFileError: a missing, truncated or undecodable file, or a mode that cannot be
            converted faithfully; the message names the file.
    """
    path = Path(path)
    im, file_format = _open(path)
    with im:
        return _to_tensor(im, path, file_format)


def read_mask(path: str | Path) -> np.ndarray:
    """A mask file (one integer channel: instance or class values) as ``[H, W]``, EXIF applied.

    Raises:
        ImageFileError: as ``read_image``, or the file has colour channels.
    """
    path = Path(path)
    im, _ = _open(path)
    with im:
        if im.mode not in _MASK_MODES:
            raise ImageFileError(
                f"{path}: a mask must have one integer channel (PIL mode L, P, I or I;16), "
                f"got mode {im.mode!r}"
            )
        return np.asarray(im)


def oriented_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of an image as oriented by its EXIF tag, from its header only.

    Raises:
        ImageFileError: the file is missing or not an image.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            width, height = im.size
            turned = _orientation(im) in _TRANSPOSED
    except FileNotFoundError:
        raise ImageFileError(f"{path}: file not found") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageFileError(f"{path}: cannot be decoded: {error}") from None
    return (height, width) if turned else (width, height)


def exif_orientation(path: str | Path) -> int:
    """The EXIF orientation tag of an image (1, upright, when it has none)."""
    with Image.open(path) as im:
        return _orientation(im)


# --- checking before work starts --------------------------------------------------------------


@dataclass(frozen=True)
class CheckedFile:
    """What a full decode of a file found.

    Attributes:
        width: oriented width in pixels.
        height: oriented height in pixels.
        values: for a mask, the distinct pixel values, sorted; None for an image.
    """

    width: int
    height: int
    values: tuple[int, ...] | None = None


def _check(path: Path, kind: Kind) -> CheckedFile:
    """Decode ``path`` fully and apply ``read_image``'s (or ``read_mask``'s) rules, without
    making the float tensor (on a busy CPU that costs more than the decoding)."""
    if kind == "mask":
        mask = read_mask(path)
        return CheckedFile(mask.shape[1], mask.shape[0], tuple(int(v) for v in np.unique(mask)))
    im, file_format = _open(path)
    with im:
        _rule(im, path, file_format)
        return CheckedFile(im.width, im.height)


_VERSION = 1  # of the decoding rules: a cache written under other rules is ignored
_memory: dict[tuple[str, str, int, int], CheckedFile] = {}
_memory_lock = threading.Lock()


def cache_dir() -> Path:
    """Where ``check_files`` keeps its records: see the module docstring."""
    if os.environ.get("HARDMINE_CACHE_DIR"):
        return Path(os.environ["HARDMINE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hardmine"


def _key(path: Path, kind: Kind) -> tuple[str, str, int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return kind, str(path.resolve()), stat.st_size, stat.st_mtime_ns


def _cache_file(name: str) -> Path:
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    return cache_dir() / "checked-files" / f"{digest}.json"


def _load_cache(file: Path) -> dict[tuple[str, str, int, int], CheckedFile]:
    try:
        data = json.loads(file.read_text())
        if data.get("version") != _VERSION:
            return {}
        return {
            (kind, path, size, mtime): CheckedFile(w, h, None if values is None else tuple(values))
            for kind, path, size, mtime, w, h, values in data["files"]
        }
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # no cache, or one this version cannot read: check afresh


def _save_cache(file: Path, records: dict[tuple[str, str, int, int], CheckedFile]) -> None:
    files = [[*key, c.width, c.height, c.values] for key, c in records.items()]
    # A read-only home: the check is still right, only not remembered.
    with contextlib.suppress(OSError):
        write_atomic(file, json.dumps({"version": _VERSION, "files": files}))


def check_files(
    paths: Sequence[Path],
    kind: Kind,
    *,
    cache_name: str | None = None,
    threads: int | None = None,
) -> list[CheckedFile | ImageFileError]:
    """Decode every file fully, in threads, unless a record says it was checked unchanged.

    Args:
        paths: the files.
        kind: ``"image"`` (``read_image``) or ``"mask"`` (``read_mask``).
        cache_name: names the on-disk record (e.g. the annotation file's path); None keeps the
            records in memory only.
        threads: decoding threads; the CPUs this process may use by default.

    Returns:
        Per path, what the decode found, or the error that names the file.
    """
    keys = [_key(p, kind) for p in paths]
    disk_file = _cache_file(f"{kind}:{cache_name}") if cache_name is not None else None
    disk = _load_cache(disk_file) if disk_file is not None else {}
    with _memory_lock:
        known = {**disk, **_memory}
    todo = sorted({i for i, k in enumerate(keys) if k is None or k not in known})
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    width = max(1, min(threads, len(todo)))

    def run(i: int) -> CheckedFile | ImageFileError:
        try:
            return _check(paths[i], kind)
        except ImageFileError as error:
            return error

    if width > 1:
        with ThreadPoolExecutor(width, thread_name_prefix="hardmine-check") as pool:
            found = dict(zip(todo, pool.map(run, todo), strict=True))
    else:
        found = {i: run(i) for i in todo}
    fresh = {
        keys[i]: result
        for i, result in found.items()
        if keys[i] is not None and isinstance(result, CheckedFile)
    }
    with _memory_lock:
        _memory.update(fresh)
    if disk_file is not None and fresh:
        wanted = {k for k in keys if k is not None}
        _save_cache(disk_file, {k: v for k, v in {**disk, **fresh}.items() if k in wanted})
    return [found[i] if i in found else known[keys[i]] for i in range(len(paths))]  # type: ignore[index]


def describe_orientation(path: Path) -> str:
    """`` (EXIF orientation 6 turns it by 90 degrees)`` for a turned image, else ``""``."""
    try:
        orientation = exif_orientation(path)
    except (OSError, SyntaxError, ValueError):
        return ""
    if orientation == 1:
        return ""
    turn = "turns it by 90 degrees" if orientation in _TRANSPOSED else "flips or rotates it"
    return f" (after its EXIF orientation {orientation}, which {turn})"
