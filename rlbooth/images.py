"""Reading user photos safely, and writing image grids people can look at."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from rlbooth.errors import RlboothError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})


class ImageError(RlboothError, ValueError):
    """A photo cannot be used; the message names the file and what would fix it."""


def list_images(folder: Path) -> list[Path]:
    """The image files of a folder, sorted; hidden files are ignored, any other file is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(f"images folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    others = [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    if others:
        raise ImageError(f"{others[0]} is not an image (expected one of {sorted(IMAGE_SUFFIXES)}); "
                         f"move it out of {folder}")
    if not files:
        raise ImageError(f"images folder {folder} holds no images")
    return files


def check_images(folder: Path, resolution: int) -> list[Path]:
    """Open every photo before any model is loaded: corrupt files are errors, odd ones warnings."""
    paths = list_images(folder)
    for path in paths:
        try:
            with Image.open(path) as img:
                img.load()
                mode, size = img.mode, ImageOps.exif_transpose(img).size
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise ImageError(f"{path} cannot be read as an image ({err}); replace or remove it") from None
        if mode not in ("RGB", "L", "RGBA", "CMYK", "P", "LA", "1", "I;16", "I", "F"):
            raise ImageError(f"{path} has unsupported mode {mode}; save it as RGB")
        if mode != "RGB":
            logger.warning("%s is %s; it will be converted to RGB%s", path, mode,
                           " on a white background" if "A" in mode or mode == "P" else "")
        if min(size) < resolution:
            logger.warning("%s is %dx%d, smaller than the %d px training resolution; it will be upscaled",
                           path, *size, resolution)
    return paths


def to_rgb(img: Image.Image) -> Image.Image:
    """EXIF orientation applied, alpha flattened on white, any mode to RGB."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        img = _to_8bit_gray(img)
    if img.mode in ("RGBA", "LA", "P"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def _to_8bit_gray(img: Image.Image) -> Image.Image:
    """Rescale a high-bit-depth grayscale image to 'L' (Pillow's own convert clips instead of scaling).

    16-bit modes (`I;16*`, and `I` whose values fit in 16 bits) are divided by 257, so 65535 maps to 255;
    mode `I` with values above 65535 is scaled by its maximum. Float (`F`) is taken as [0, 1] when its
    maximum is at most 1, else as [0, 255]. Values are then clipped to [0, 255].
    """
    arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    peak = float(arr.max()) if arr.size else 0.0
    if img.mode == "F":
        scale = 255.0 if peak <= 1.0 else 1.0
    elif img.mode == "I" and peak > 65535:
        scale = 255.0 / peak
    else:
        scale = 1.0 / 257.0
    arr = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)  # 2-D uint8 -> mode L


def load_image(path: Path, resolution: int, center_crop: bool = True, rng: np.random.Generator | None = None
               ) -> Image.Image:
    """Shorter side resized to `resolution` (bicubic), then a square crop: the centre or a seeded random one."""
    return load_image_with_geometry(path, resolution, center_crop, rng)[0]


def load_image_with_geometry(path: Path, resolution: int, center_crop: bool = True,
                             rng: np.random.Generator | None = None) -> tuple[Image.Image, tuple[int, ...]]:
    """`load_image` and where the crop came from: (original height, width, crop top, left, target height,
    width), the size conditioning SDXL was trained with."""
    with Image.open(path) as raw:
        img = to_rgb(raw)
    original = (img.height, img.width)
    scale = resolution / min(img.size)
    size = (max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale)))
    img = img.resize(size, Image.BICUBIC)
    if center_crop or rng is None:
        left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
    else:
        left = int(rng.integers(0, img.width - resolution + 1))
        top = int(rng.integers(0, img.height - resolution + 1))
    return img.crop((left, top, left + resolution, top + resolution)), (*original, top, left, resolution, resolution)


def make_grid(images: list[Image.Image], cols: int) -> Image.Image:
    """Row-major grid of equally sized images."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    return grid


def enlarge(img: Image.Image, min_side: int) -> Image.Image:
    """Integer nearest-neighbour upscale until the shorter side reaches `min_side`: small samples (the toy
    world's 32 px) stay exact pixel blocks instead of a blur, and become big enough to look at."""
    factor = max(1, -(-min_side // min(img.size)))
    return img if factor == 1 else img.resize((img.width * factor, img.height * factor), Image.NEAREST)


def save_image_atomic(img: Image.Image, path: Path) -> None:
    """Write to a temporary name, then rename, so a killed run never leaves half a PNG (a full disk: DiskFullError)."""
    from rlbooth.files import kill_point, replacing

    with replacing(path) as tmp:
        img.save(tmp, format="PNG")
        kill_point("image-write")


def is_readable_image(path: Path) -> bool:
    """Whether the file exists and decodes whole: rlbooth's own images that do not are drawn again."""
    try:
        with Image.open(path) as img:
            img.load()
        return True
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return False
