"""Drawing images with the standard diffusers pipeline: validation grids during training, and `rlbooth sample`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from rlbooth.images import make_grid

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline
    from PIL import Image

    from rlbooth.families import Conditioning
    from rlbooth.stages import StageOutput


@dataclass
class Encoded:
    """Prompts' conditioning encoded earlier, for pipelines drawn while the text encoders are off the device."""

    cond: Callable[[list[str]], "Conditioning"]
    """The conditioning of these prompts, one row each (the family's `encode_prompts` output)."""
    uncond: "Conditioning"
    """The family's `unconditional()` row."""


@torch.no_grad()
def draw(pipe: "DiffusionPipeline", prompts: list[str], seeds: list[int], num_inference_steps: int,
         guidance_scale: float, autocast_dtype: torch.dtype | None = None,
         resolution: int | None = None, encoded: Encoded | None = None) -> list["Image.Image"]:
    """One image per (prompt, seed), prompt-major; image (p, s) depends only on p and s, not the batch.

    `resolution` (square) where the pipeline's default size is not wanted; see `fixed_resolution`.
    `encoded` gives the prompts' conditioning computed earlier, so that no text encoder runs (they may
    wait in host memory); without it the pipeline encodes the prompts.
    """
    pipe.set_progress_bar_config(disable=True)
    size = {} if resolution is None else {"height": resolution, "width": resolution}
    device = pipe.device
    images = []
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        for prompt in prompts:
            generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
            images += pipe(num_inference_steps=num_inference_steps, generator=generators, **size,
                           **call_kwargs(pipe, prompt, len(seeds), guidance_scale, encoded)).images
    return images


def call_kwargs(pipe: "DiffusionPipeline", prompt: str, n: int, guidance_scale: float,
                encoded: Encoded | None = None) -> dict:
    """The pipeline's arguments for `n` images of `prompt` at `guidance_scale`: the text, or its embeddings."""
    from rlbooth.families import family_of

    family = family_of(pipe)
    text = {"prompt": [prompt] * n} if encoded is None else family.embeds_kwargs(
        encoded.cond([prompt]).repeat_interleave(n), encoded.uncond)
    return family.guidance_kwargs(guidance_scale) | text | family.call_kwargs(pipe)


def draw_grid(pipe: "DiffusionPipeline", prompts: list[str], seeds: list[int], num_inference_steps: int,
              guidance_scale: float, autocast_dtype: torch.dtype | None = None,
              resolution: int | None = None, encoded: Encoded | None = None) -> "Image.Image":
    """A grid with one row per prompt and one column per seed."""
    images = draw(pipe, prompts, seeds, num_inference_steps, guidance_scale, autocast_dtype, resolution, encoded)
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
