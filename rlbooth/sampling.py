"""Drawing images with the standard diffusers pipeline: validation grids during training, and `rlbooth sample`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from rlbooth.images import make_grid

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline
    from PIL import Image

    from rlbooth.stages import StageOutput


@torch.no_grad()
def draw(pipe: "DiffusionPipeline", prompts: list[str], seeds: list[int], num_inference_steps: int,
         guidance_scale: float, autocast_dtype: torch.dtype | None = None,
         resolution: int | None = None) -> list["Image.Image"]:
    """One image per (prompt, seed), prompt-major; image (p, s) depends only on p and s, not the batch.

    `resolution` (square) where the pipeline's default size is not wanted; see `fixed_resolution`.
    """
    from rlbooth.families import family_of

    pipe.set_progress_bar_config(disable=True)
    size = {} if resolution is None else {"height": resolution, "width": resolution}
    device = pipe.device
    images = []
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        for prompt in prompts:
            generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
            images += pipe([prompt] * len(seeds), num_inference_steps=num_inference_steps,
                           generator=generators, **size, **family_of(pipe).guidance_kwargs(guidance_scale),
                           **family_of(pipe).call_kwargs(pipe)).images
    return images


def draw_grid(pipe: "DiffusionPipeline", prompts: list[str], seeds: list[int], num_inference_steps: int,
              guidance_scale: float, autocast_dtype: torch.dtype | None = None,
              resolution: int | None = None) -> "Image.Image":
    """A grid with one row per prompt and one column per seed."""
    images = draw(pipe, prompts, seeds, num_inference_steps, guidance_scale, autocast_dtype, resolution)
    return make_grid(images, cols=len(seeds))


def sample_stage(stage: "StageOutput", prompts: list[str], seeds: list[int], num_inference_steps: int,
                 guidance_scale: float) -> list["Image.Image"]:
    """Draw from a finished stage's output, loaded the standard diffusers way (LoRAs as adapters)."""
    from rlbooth.stages import load_stage_pipeline, read_stage

    pipe = load_stage_pipeline(stage)
    pipe.to("cuda" if torch.cuda.is_available() else "cpu")
    one = stage.metadata if stage.stage == "personalize" else read_stage(stage.metadata["stage_one"]).metadata
    resolution = fixed_resolution(pipe, one["config"]["personalize"]["resolution"])
    return draw(pipe, prompts, seeds, num_inference_steps, guidance_scale, resolution=resolution)


def fixed_resolution(pipe: "DiffusionPipeline", trained_at: int) -> int | None:
    """None (the pipeline's default size) where the denoiser has a native size; FLUX's transformer has none
    (its pipeline's default is 1024 px whatever the model), so it draws at the resolution stage one trained at."""
    from rlbooth.families import family_of

    return None if getattr(pipe, family_of(pipe).denoiser).config.get("sample_size") else trained_at
