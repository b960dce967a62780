"""Image files decoded faithfully or refused by name (``hardmine.data.images``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from hardmine.data import images
from hardmine.data.images import (
    TRANSPARENT_BACKGROUND,
    CheckedFile,
    ImageFileError,
    check_files,
    oriented_size,
    read_image,
    read_mask,
)

BACKGROUND = torch.tensor(TRANSPARENT_BACKGROUND)[:, None, None]


def _save(im: Image.Image, path: Path, **kwargs) -> Path:
    im.save(path, **kwargs)
    return path


def test_16_bit_greyscale_is_scaled_by_its_full_range(tmp_path: Path) -> None:
    # Pillow's own conversion to RGB clips it: 98% of these pixels became 1.0.
    values = (np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "g16.png")
    with Image.open(path) as im:
        assert im.mode == "I;16"
    image = read_image(path)
    assert image.shape == (3, 48, 64) and image.dtype == torch.float32
    expected = torch.from_numpy(values.astype(np.float32) / 65535)
    for channel in image:
        torch.testing.assert_close(channel, expected, rtol=0, atol=1e-7)
    assert len(torch.unique(image)) == 48 * 64  # every grey level kept
    tiff = _save(Image.fromarray(values), tmp_path / "g16.tif")
    torch.testing.assert_close(read_image(tiff), image)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    path = _save(Image.fromarray(pixels), tmp_path / "turned.png", exif=exif)
    image = read_image(path)
    assert image.shape == (3, 40, 30)
    with Image.open(path) as im:
        expected = np.array(ImageOps.exif_transpose(im))  # detectron2's and mmcv's reading
    torch.testing.assert_close(image, torch.from_numpy(expected).permute(2, 0, 1) / 255)
    assert torch.equal(image, torch.from_numpy(np.rot90(pixels, -1).copy()).permute(2, 0, 1) / 255)
    assert oriented_size(path) == (30, 40)
    jpeg = _save(Image.fromarray(pixels), tmp_path / "turned.jpg", exif=exif)
    assert read_image(jpeg).shape == (3, 40, 30) and oriented_size(jpeg) == (30, 40)


@pytest.mark.parametrize(
    ("make", "alpha"),
    [
        (lambda: Image.new("RGBA", (4, 3), (255, 0, 0, 0)), 0.0),
        (lambda: Image.new("RGBA", (4, 3), (255, 0, 0, 255)), 1.0),
        (lambda: Image.new("RGBA", (4, 3), (255, 0, 0, 51)), 0.2),
        (lambda: Image.new("LA", (4, 3), (255, 51)), 0.2),
    ],
)
def test_transparency_is_composited_over_the_stated_background(tmp_path, make, alpha) -> None:
    im = make()
    path = _save(im, tmp_path / "a.png")
    colour = torch.tensor(im.convert("RGB").getpixel((0, 0)), dtype=torch.float32) / 255
    expected = alpha * colour[:, None, None] + (1 - alpha) * BACKGROUND
    torch.testing.assert_close(read_image(path), expected.expand(3, 3, 4))


def test_transparent_palette_entry_and_colour_key(tmp_path: Path) -> None:
    palette = Image.new("P", (4, 3), 0)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((1, 1), 1)
    image = read_image(_save(palette, tmp_path / "p.png", transparency=0))
    torch.testing.assert_close(image[:, 0, 0], BACKGROUND[:, 0, 0])
    torch.testing.assert_close(image[:, 1, 1], torch.tensor([0.0, 1.0, 0.0]))
    key = Image.new("RGB", (4, 3), (1, 2, 3))
    image = read_image(_save(key, tmp_path / "key.png", transparency=(1, 2, 3)))
    torch.testing.assert_close(image, BACKGROUND.expand(3, 3, 4))


@pytest.mark.parametrize(
    ("im", "name", "rgb"),
    [
        (Image.new("L", (4, 3), 51), "l.png", (51, 51, 51)),
        (Image.new("1", (4, 3), 1), "b.png", (255, 255, 255)),
        (Image.new("CMYK", (4, 3), (0, 255, 255, 0)), "c.tif", (255, 0, 0)),
        (Image.new("CMYK", (4, 3), (0, 255, 255, 0)), "c.jpg", None),
        (Image.new("YCbCr", (4, 3), (128, 128, 128)), "y.jpg", None),
        (Image.new("RGB", (4, 3), (10, 20, 30)), "rgb.png", (10, 20, 30)),
    ],
)
def test_eight_bit_modes_become_rgb(tmp_path, im, name, rgb) -> None:
    image = read_image(_save(im, tmp_path / name))
    assert image.shape == (3, 3, 4)
    if rgb is not None:
        torch.testing.assert_close(image[:, 0, 0], torch.tensor(rgb, dtype=torch.float32) / 255)
    else:  # lossy: Pillow's RGB of the decoded file
        with Image.open(tmp_path / name) as decoded:
            expected = np.asarray(decoded.convert("RGB"), dtype=np.float32) / 255
        torch.testing.assert_close(image, torch.from_numpy(expected).permute(2, 0, 1))


def test_float_pixels_in_range_are_kept_and_others_refused(tmp_path: Path) -> None:
    values = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    image = read_image(_save(Image.fromarray(values), tmp_path / "f.tif"))
    torch.testing.assert_close(image, torch.from_numpy(values).expand(3, 3, 4))
    bad = _save(Image.fromarray(values * 4), tmp_path / "f4.tif")
    with pytest.raises(ImageFileError, match=r"f4\.tif: 32-bit float pixels outside \[0, 1\]"):
        read_image(bad)


def test_32_bit_integers_are_refused_by_name(tmp_path: Path) -> None:
    path = _save(Image.new("I", (4, 3), 300), tmp_path / "i.tif")
    with pytest.raises(ImageFileError, match=r"i\.tif: 32-bit integer pixels .* no stated range"):
        read_image(path)


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
@pytest.mark.parametrize("cut", [1, 3, 5, 13, 200])
def test_files_missing_their_last_bytes_are_refused(tmp_path, suffix, cut) -> None:
    pixels = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    path = _save(Image.fromarray(pixels), tmp_path / f"x{suffix}")
    data = path.read_bytes()
    path.write_bytes(data[:-cut])
    with pytest.raises(ImageFileError, match=rf"x\{suffix}: .*truncated"):
        read_image(path)


def test_jpeg_missing_only_its_end_marker_decodes_to_the_same_pixels(tmp_path: Path) -> None:
    # Here the entropy-coded data ends before the last two bytes (the EOI marker): libjpeg
    # decodes every pixel, the same as from the whole file, so nothing is refused.
    pixels = np.random.default_rng(1).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    path = _save(Image.fromarray(pixels), tmp_path / "x.jpg")
    whole = read_image(path)
    data = path.read_bytes()
    assert data[-2:] == b"\xff\xd9"
    for cut in (1, 2):
        path.write_bytes(data[:-cut])
        assert torch.equal(read_image(path), whole)
    path.write_bytes(data[:-3])
    with pytest.raises(ImageFileError, match="truncated"):
        read_image(path)


def test_missing_and_non_image_files(tmp_path: Path) -> None:
    with pytest.raises(ImageFileError, match=r"gone\.png: file not found"):
        read_image(tmp_path / "gone.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ImageFileError, match=r"text\.png: cannot be decoded"):
        read_image(tmp_path / "text.png")


def test_masks_have_one_channel(tmp_path: Path) -> None:
    values = np.zeros((3, 4), np.uint8)
    values[1, 2] = 7
    assert np.array_equal(read_mask(_save(Image.fromarray(values), tmp_path / "m.png")), values)
    with pytest.raises(ImageFileError, match=r"rgb\.png: a mask must have one integer channel"):
        read_mask(_save(Image.new("RGB", (4, 3)), tmp_path / "rgb.png"))


def test_check_files_decodes_in_threads_and_remembers(tmp_path, monkeypatch) -> None:
    paths = []
    for i in range(6):
        paths.append(_save(Image.new("RGB", (8 + i, 5), (i, 0, 0)), tmp_path / f"{i}.png"))
    bad = tmp_path / "3.png"
    bad.write_bytes(bad.read_bytes()[:-20])
    calls: list[Path] = []
    original = images._check
    monkeypatch.setattr(images, "_check", lambda p, kind: calls.append(p) or original(p, kind))

    found = check_files(paths, "image", cache_name="a", threads=3)
    assert [f.width if isinstance(f, CheckedFile) else None for f in found] == [
        8, 9, 10, None, 12, 13
    ]  # fmt: skip
    assert isinstance(found[3], ImageFileError) and "3.png" in str(found[3])
    assert sorted(calls) == sorted(paths)
    # In memory: only the bad file is decoded again.
    calls.clear()
    check_files(paths, "image", cache_name="a")
    assert calls == [bad]
    # On disk (a new process forgets the memory): the same; a changed file is decoded again.
    monkeypatch.setattr(images, "_memory", {})
    calls.clear()
    os.utime(paths[0], ns=(1, 1))
    again = check_files(paths, "image", cache_name="a")
    assert sorted(calls) == sorted([bad, paths[0]]) and again[1] == found[1]
    records = list(images.cache_dir().rglob("*.json"))
    assert len(records) == 1 and not list(tmp_path.glob("*.json"))  # nothing in the data folder


def test_premultiplied_alpha(tmp_path: Path) -> None:
    # No format stores La / RGBa, but a plugin may decode to them: white at 20% opacity.
    for im in (Image.new("La", (4, 3), (51, 51)), Image.new("RGBa", (4, 3), (51, 51, 51, 51))):
        image = images._to_tensor(im, tmp_path / "x", None)
        torch.testing.assert_close(image, (0.2 + 0.8 * BACKGROUND).expand(3, 3, 4))
