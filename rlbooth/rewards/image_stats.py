"""Weight-free rewards: image statistics that need no model download.

They let the RL loop run and be tested offline on CPU: JPEG compressibility is DDPO's first
task, and brightness and saturation are trivially learnable, so a test can see the reward rise.
Brightness and saturation are torch all the way, so they backpropagate (reward feedback learning);
JPEG sizes come from PIL's encoder and do not.
"""

from __future__ import annotations

import io

import torch
from PIL import Image

from rlbooth.rewards import RewardError, RewardFn, as_float, register, reward_output, validate_batch


def _to_uint8(images: torch.Tensor) -> list[Image.Image]:
    """Quantizes like an image file would, so JPEG sees what a user would save."""
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(array) for array in pixels.permute(0, 2, 3, 1).cpu().numpy()]


def _jpeg_kb(images: torch.Tensor, quality: int) -> torch.Tensor:
    sizes = []
    for image in _to_uint8(images):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)  # kB as in ddpo-pytorch, so reward scales compare
    return torch.tensor(sizes, dtype=torch.float32)


def _jpeg_reward(quality: int, sign: float) -> RewardFn:
    if not 1 <= quality <= 100:
        raise RewardError(f"jpeg quality must be in [1, 100], got {quality}")

    @torch.no_grad()
    def reward(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        validate_batch(images, prompts, metadata)
        return sign * _jpeg_kb(images, quality)

    return reward


@register("jpeg_compressibility")
def jpeg_compressibility(quality: int = 95) -> RewardFn:
    """Minus the JPEG size in kB: rewards simple, smooth images."""
    return _jpeg_reward(quality, -1.0)


@register("jpeg_incompressibility")
def jpeg_incompressibility(quality: int = 95) -> RewardFn:
    """The JPEG size in kB: rewards detail and texture."""
    return _jpeg_reward(quality, 1.0)


def _brightness(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
    validate_batch(images, prompts, metadata)
    return reward_output(as_float(images).mean(dim=(1, 2, 3)), images)


def _saturation(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
    validate_batch(images, prompts, metadata)
    pixels = as_float(images)
    top, bottom = pixels.amax(dim=1), pixels.amin(dim=1)
    # HSV saturation; black has top == bottom == 0, so the clamp turns 0/0 into 0.
    return reward_output(((top - bottom) / top.clamp_min(1e-12)).mean(dim=(1, 2)), images)


@register("brightness", differentiable=True)
def brightness() -> RewardFn:
    """Mean pixel value in [0, 1]."""
    return _brightness


@register("saturation", differentiable=True)
def saturation() -> RewardFn:
    """Mean HSV saturation in [0, 1]: grey is 0, pure colours are 1."""
    return _saturation
