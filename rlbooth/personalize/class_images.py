"""Prior-preservation images: drawn by the base model itself, only the missing ones, with fixed seeds."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from rlbooth.images import is_readable_image, save_image_atomic
from rlbooth.sampling import draw

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator
    from diffusers import DiffusionPipeline

    from rlbooth.sampling import Encoded

logger = logging.getLogger(__name__)


def class_image_path(folder: Path, index: int) -> Path:
    return folder / f"{index:05d}.png"


def missing_class_images(folder: Path, count: int) -> list[int]:
    """Indices whose image is not on disk yet, or does not decode whole; an interrupted generation resumes
    from these (the images are written atomically, so a damaged one came from elsewhere: it is redrawn)."""
    missing = []
    for i in range(count):
        path = class_image_path(folder, i)
        if path.is_file() and is_readable_image(path):
            continue
        if path.is_file():
            logger.warning("class image %s is damaged: drawing it again", path)
        missing.append(i)
    return missing


def generate_class_images(
    pipe: "DiffusionPipeline",
    prompt: str,
    folder: Path,
    count: int,
    *,
    seed: int,
    num_inference_steps: int,
    guidance_scale: float,
    batch_size: int,
    accelerator: "Accelerator",
    encoded: "Encoded | None" = None,
    resolution: int | None = None,
    autocast_dtype: "torch.dtype | None" = None,
) -> list[Path]:
    """Fill `folder` with `count` images of `prompt`; image i always comes from seed `seed + i`.

    Each process draws its share of the missing indices, so several GPUs split the work. Drawn as the sample
    grids are (`rlbooth.sampling.draw`): at `resolution` where the pipeline's default size is not wanted
    (`fixed_resolution`), under autocast where the frozen weights are 16-bit and the trained ones are not.
    """
    folder.mkdir(parents=True, exist_ok=True)
    todo = missing_class_images(folder, count)[accelerator.process_index::accelerator.num_processes]
    if todo:
        logger.info("drawing %d class images of %r into %s", len(todo), prompt, folder)
        bar = tqdm(total=len(todo), desc="class images", disable=not accelerator.is_local_main_process)
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            images = draw(pipe, [prompt], [seed + i for i in chunk], num_inference_steps, guidance_scale,
                          autocast_dtype, resolution, encoded)
            for index, image in zip(chunk, images):
                save_image_atomic(image, class_image_path(folder, index))
            bar.update(len(chunk))
        bar.close()
    accelerator.wait_for_everyone()
    return [class_image_path(folder, i) for i in range(count)]
