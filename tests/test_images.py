"""Reading user photos (errors name the file, odd modes warn) and writing grids."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rlbooth.images import (ImageError, check_images, enlarge, list_images, load_image, make_grid, save_image_atomic,
                            to_rgb)

RES = 32


def photo(path: Path, size=(64, 48), color=(200, 30, 30), mode="RGB", **save_kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, color)
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path, **save_kwargs)
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    photo(tmp_path / "photos" / "b.jpg")
    photo(tmp_path / "photos" / "a.png")
    photo(tmp_path / "photos" / "C.JPEG", format="JPEG")
    return tmp_path / "photos"


# --------------------------------------------------------------------------- listing and checking


def test_list_images_sorted(folder: Path):
    assert [p.name for p in list_images(folder)] == ["C.JPEG", "a.png", "b.jpg"]
    assert check_images(folder, RES) == list_images(folder)


def test_missing_folder(tmp_path: Path):
    with pytest.raises(ImageError, match="does not exist") as err:
        check_images(tmp_path / "nope", RES)
    assert str(tmp_path / "nope") in str(err.value)


def test_folder_is_a_file(tmp_path: Path):
    path = photo(tmp_path / "x.png")
    with pytest.raises(ImageError, match="does not exist"):
        check_images(path, RES)


@pytest.mark.parametrize("hidden", [[], [".DS_Store"], [".hidden.png", "._a.jpg"]])
def test_empty_folder(tmp_path: Path, hidden: list[str]):
    (tmp_path / "photos").mkdir()
    for name in hidden:
        (tmp_path / "photos" / name).write_bytes(os.urandom(64))
    with pytest.raises(ImageError, match="holds no images") as err:
        check_images(tmp_path / "photos", RES)
    assert str(tmp_path / "photos") in str(err.value)


@pytest.mark.parametrize("name", ["notes.txt", "README", "clip.gif", "photo.jpg.bak"])
def test_non_image_file_named(folder: Path, name: str):
    (folder / name).write_text("not a photo")
    with pytest.raises(ImageError, match="is not an image") as err:
        check_images(folder, RES)
    assert str(folder / name) in str(err.value)


def test_hidden_files_and_subfolders_ignored(folder: Path):
    (folder / ".DS_Store").write_bytes(os.urandom(100))
    (folder / "._b.jpg").write_bytes(os.urandom(100))  # macOS resource fork: random bytes with an image suffix
    (folder / "sub").mkdir()
    photo(folder / "sub" / "z.png")
    assert [p.name for p in check_images(folder, RES)] == ["C.JPEG", "a.png", "b.jpg"]


def _truncated_jpeg(path: Path) -> None:
    photo(path.with_suffix(".full.jpg"), size=(256, 256))
    data = path.with_suffix(".full.jpg").read_bytes()
    path.with_suffix(".full.jpg").unlink()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("name, make", [
    ("broken.jpg", lambda p: p.write_bytes(os.urandom(2048))),
    ("empty.png", lambda p: p.write_bytes(b"")),
    ("text.png", lambda p: p.write_text("hello")),
    ("truncated.jpg", _truncated_jpeg),
])
def test_corrupt_image_named(folder: Path, name: str, make):
    make(folder / name)
    with pytest.raises(ImageError, match="cannot be read") as err:
        check_images(folder, RES)
    assert str(folder / name) in str(err.value)


@pytest.mark.parametrize("mode, suffix, alpha", [
    ("RGBA", ".png", True),
    ("LA", ".png", True),
    ("L", ".png", False),
    ("L", ".jpg", False),
    ("CMYK", ".jpg", False),
    ("P", ".png", True),
])
def test_odd_modes_warn_and_load_as_rgb(tmp_path: Path, caplog, mode: str, suffix: str, alpha: bool):
    path = photo(tmp_path / "photos" / f"odd{suffix}", size=(50, 40), mode=mode)
    assert Image.open(path).mode == mode
    with caplog.at_level(logging.WARNING, logger="rlbooth.images"):
        assert check_images(tmp_path / "photos", RES) == [path]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert str(path) in warnings[0] and mode in warnings[0] and "RGB" in warnings[0]
    assert ("white background" in warnings[0]) == alpha
    img = load_image(path, RES)
    assert img.mode == "RGB"
    assert img.size == (RES, RES)


def test_rgb_photo_no_warning(folder: Path, caplog):
    with caplog.at_level(logging.WARNING, logger="rlbooth.images"):
        check_images(folder, RES)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_transparent_pixels_flattened_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgb = to_rgb(rgba)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((1, 1)) == (255, 255, 255)
    assert rgb.getpixel((0, 0)) == (0, 0, 255)


def test_palette_transparency_flattened_on_white():
    p = Image.new("P", (4, 4), 0)
    p.putpalette([10, 20, 30, 200, 0, 0] + [0] * 762)
    p.putpixel((0, 0), 1)
    p.info["transparency"] = 0
    rgb = to_rgb(p)
    assert rgb.getpixel((1, 1)) == (255, 255, 255)
    assert rgb.getpixel((0, 0)) == (200, 0, 0)


@pytest.mark.parametrize("size", [(16, 16), (20, 100), (100, 31)])
def test_small_image_warns_and_upscales(tmp_path: Path, caplog, size):
    path = photo(tmp_path / "photos" / "small.png", size=size)
    with caplog.at_level(logging.WARNING, logger="rlbooth.images"):
        check_images(tmp_path / "photos", RES)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0] and "smaller" in warnings[0]
    assert f"{size[0]}x{size[1]}" in warnings[0]
    assert load_image(path, RES).size == (RES, RES)


def test_large_enough_no_warning(tmp_path: Path, caplog):
    photo(tmp_path / "photos" / "ok.png", size=(RES, RES * 3))
    with caplog.at_level(logging.WARNING, logger="rlbooth.images"):
        check_images(tmp_path / "photos", RES)
    assert not caplog.records


def test_resolution_zero_accepts_any_size(tmp_path: Path, caplog):
    photo(tmp_path / "photos" / "tiny.png", size=(2, 2))
    with caplog.at_level(logging.WARNING, logger="rlbooth.images"):
        check_images(tmp_path / "photos", 0)
    assert not caplog.records


# --------------------------------------------------------------------------- EXIF orientation


def exif_photo(path: Path, orientation: int) -> Path:
    """40x20 stored pixels: left half red, right half blue, with an EXIF Orientation tag."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, format="JPEG", quality=95, exif=exif)
    return path


@pytest.mark.parametrize("orientation, size", [(1, (40, 20)), (3, (40, 20)), (6, (20, 40)), (8, (20, 40))])
def test_to_rgb_applies_exif_orientation(tmp_path: Path, orientation: int, size):
    path = exif_photo(tmp_path / "o.jpg", orientation)
    with Image.open(path) as raw:
        assert raw.size == (40, 20)
        assert raw.getexif()[0x0112] == orientation
        img = to_rgb(raw)
    assert img.size == size


def _reddish(px) -> bool:
    return px[0] > 180 and px[2] < 80


def _bluish(px) -> bool:
    return px[2] > 180 and px[0] < 80


def test_load_image_applies_exif_orientation(tmp_path: Path):
    """Orientation 6 means "rotate 90 degrees clockwise to display": red (left) ends on top, blue at the bottom."""
    img = load_image(exif_photo(tmp_path / "o.jpg", 6), 20)
    assert img.size == (20, 20)
    for x in (2, 10, 17):
        assert _reddish(img.getpixel((x, 2))), img.getpixel((x, 2))
        assert _bluish(img.getpixel((x, 17))), img.getpixel((x, 17))


def test_check_images_uses_oriented_size(tmp_path: Path, caplog):
    exif_photo(tmp_path / "photos" / "o.jpg", 6)
    with caplog.at_level(logging.WARNING, logger="rlbooth.images"):
        check_images(tmp_path / "photos", 64)
    assert "20x40" in caplog.text


# --------------------------------------------------------------------------- load_image geometry


@pytest.mark.parametrize("size", [(64, 64), (64, 32), (32, 64), (33, 77), (100, 31), (5, 300), (1, 1), (32, 32)])
@pytest.mark.parametrize("resolution", [16, 32])
def test_load_image_exact_size(tmp_path: Path, size, resolution: int):
    path = photo(tmp_path / "p.png", size=size)
    img = load_image(path, resolution)
    assert img.size == (resolution, resolution)
    assert img.mode == "RGB"


def test_center_crop_takes_the_middle(tmp_path: Path):
    """96x32: three 32 px bands red | green | blue; the centre crop at 32 px is all green."""
    img = Image.new("RGB", (96, 32), (255, 0, 0))
    img.paste((0, 255, 0), (32, 0, 64, 32))
    img.paste((0, 0, 255), (64, 0, 96, 32))
    img.save(tmp_path / "bands.png")
    out = np.asarray(load_image(tmp_path / "bands.png", 32))
    assert (out[:, 4:28, 1] > 200).all() and (out[:, 4:28, 0] < 50).all() and (out[:, 4:28, 2] < 50).all()


def test_random_crop_seeded_and_in_bounds(tmp_path: Path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (32, 256, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "wide.png")
    crops = [np.asarray(load_image(tmp_path / "wide.png", 32, center_crop=False, rng=np.random.default_rng(s)))
             for s in (1, 1, 2, 3, 4)]
    assert all(c.shape == (32, 32, 3) for c in crops)
    assert np.array_equal(crops[0], crops[1])  # same seed, same crop
    assert len({c.tobytes() for c in crops}) > 2  # different seeds move the crop
    # every crop is a window of the original (no resampling: shorter side already at resolution)
    for c in crops:
        assert any(np.array_equal(c, arr[:, x:x + 32]) for x in range(256 - 32 + 1))


def test_center_crop_ignores_rng(tmp_path: Path):
    photo(tmp_path / "p.png", size=(80, 32))
    a = load_image(tmp_path / "p.png", 32, center_crop=True, rng=np.random.default_rng(5))
    b = load_image(tmp_path / "p.png", 32)
    assert a.tobytes() == b.tobytes()


def test_sixteen_bit_grayscale_keeps_its_brightness(tmp_path: Path):
    Image.fromarray(np.full((40, 40), 32768, dtype=np.uint16)).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    value = load_image(tmp_path / "g16.png", 32).getpixel((16, 16))
    assert 100 <= value[0] <= 155, value


def test_sixteen_bit_png_mid_grey_loads_as_128(tmp_path: Path):
    arr = np.full((40, 40), 32896, dtype=np.uint16)  # 128 * 257
    arr[0, 0], arr[0, 1] = 0, 65535
    Image.fromarray(arr).save(tmp_path / "g16.png")
    (tmp_path / "photos").mkdir()
    Image.fromarray(arr).save(tmp_path / "photos" / "g16.png")
    assert len(check_images(tmp_path / "photos", 32)) == 1
    with Image.open(tmp_path / "g16.png") as raw:
        rgb = to_rgb(raw)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((20, 20)) == (128, 128, 128)
    assert rgb.getpixel((0, 0)) == (0, 0, 0) and rgb.getpixel((1, 0)) == (255, 255, 255)


@pytest.mark.parametrize("values, expected", [
    (np.array([[0, 32896, 65535]], dtype=np.int32), [0, 128, 255]),  # 16-bit range in mode I: / 257
    (np.array([[0, 500_000, 1_000_000]], dtype=np.int32), [0, 128, 255]),  # beyond 16 bits: scaled by the max
])
def test_mode_i_rescaled(values, expected):
    img = Image.fromarray(values)
    assert img.mode == "I"
    assert [to_rgb(img).getpixel((x, 0))[0] for x in range(3)] == expected


@pytest.mark.parametrize("values, expected", [
    ([0.0, 0.5, 1.0], [0, 128, 255]),  # max <= 1: taken as [0, 1]
    ([0.0, 128.0, 255.0], [0, 128, 255]),  # otherwise [0, 255]
    ([-3.0, 128.0, 300.0], [0, 128, 255]),  # out of range is clipped
])
def test_float_image_rescaled(values, expected):
    img = Image.fromarray(np.array([values], dtype=np.float32))
    assert img.mode == "F"
    assert [to_rgb(img).getpixel((x, 0))[0] for x in range(3)] == expected


def test_bilevel_image_accepted(tmp_path: Path):
    (tmp_path / "photos").mkdir()
    Image.new("1", (40, 40), 1).save(tmp_path / "photos" / "bw.png")
    assert Image.open(tmp_path / "photos" / "bw.png").mode == "1"
    assert len(check_images(tmp_path / "photos", 32)) == 1


def test_bilevel_converts(tmp_path: Path):
    assert to_rgb(Image.new("1", (4, 4), 1)).getpixel((0, 0)) == (255, 255, 255)


# --------------------------------------------------------------------------- grid and saving


COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]


@pytest.mark.parametrize("n, cols, grid_size", [(5, 3, (3, 2)), (5, 5, (5, 1)), (5, 1, (1, 5)), (4, 2, (2, 2)),
                                                (1, 4, (4, 1))])
def test_make_grid_layout(n: int, cols: int, grid_size):
    w, h = 6, 4
    grid = make_grid([Image.new("RGB", (w, h), c) for c in COLORS[:n]], cols)
    assert grid.size == (grid_size[0] * w, grid_size[1] * h)
    for k in range(n):
        x0, y0 = (k % cols) * w, (k // cols) * h
        for dx, dy in ((0, 0), (w - 1, h - 1), (w // 2, h // 2)):
            assert grid.getpixel((x0 + dx, y0 + dy)) == COLORS[k], (k, dx, dy)
    for k in range(n, grid_size[0] * grid_size[1]):  # unused cells are white
        assert grid.getpixel(((k % cols) * w + 1, (k // cols) * h + 1)) == (255, 255, 255)


@pytest.mark.parametrize("size, min_side, factor", [((32, 32), 128, 4), ((30, 20), 128, 7), ((512, 512), 128, 1),
                                                    ((100, 200), 128, 2)])
def test_enlarge_by_whole_pixels(size, min_side: int, factor: int):
    rng = np.random.default_rng(0)
    original = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    enlarged = np.asarray(enlarge(Image.fromarray(original), min_side))
    assert min(enlarged.shape[:2]) >= min_side or factor == 1
    assert np.array_equal(enlarged, original.repeat(factor, axis=0).repeat(factor, axis=1))


def test_make_grid_empty():
    with pytest.raises(ValueError):
        make_grid([], 2)


@pytest.mark.parametrize("existing", [False, True])
def test_save_image_atomic(tmp_path: Path, existing: bool):
    target = tmp_path / "deep" / "er" / "grid.png"
    if existing:
        target.parent.mkdir(parents=True)
        Image.new("RGB", (2, 2), (0, 0, 0)).save(target)
    img = Image.new("RGB", (7, 5), (1, 2, 3))
    save_image_atomic(img, target)
    assert sorted(os.listdir(target.parent)) == ["grid.png"]  # no temp file left, hidden or not
    with Image.open(target) as back:
        assert back.format == "PNG"
        assert back.size == (7, 5)
        assert back.convert("RGB").getpixel((3, 3)) == (1, 2, 3)
