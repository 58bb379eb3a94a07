"""The differentiable path of the model rewards: when it runs, its resize, and where its scores go.

A model reward scores an image's 8-bit copy resized by PIL (`rlbooth.rewards.pil_resize`): exact, but
rounding and PIL cut the graph. Called inside `rlbooth.rewards.backpropagating()` with images that
require grad (reward feedback learning), it resizes the float images with torch's antialiased bicubic instead (the same kernel as
PIL's, a = -0.5, clamped to [0, 1] as PIL clips) and keeps its scores on the images' device, connected
to them. On the real photos in `tests/data/faces/` resized to 224 px the two resizes differ by 3.3-5.7
pixel levels at most and 0.3 on average. Called any other way, a reward is what it was.
"""

from __future__ import annotations

import torch

from rlbooth.rewards import backpropagates
from rlbooth.rewards.pil_resize import resize_bicubic


def wanted(images: torch.Tensor) -> bool:
    """Whether a reward is asked for gradients (`rlbooth.rewards.backpropagates`)."""
    return backpropagates(images)


def resize_smooth(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 3, height, width), differentiable; images already at `size` are kept.

    Half-precision images (a VAE decoding in bf16) are resized in float32: torch has no antialiased bicubic
    for them on the CPU.
    """
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    exact = images if images.dtype in (torch.float32, torch.float64) else images.float()
    resized = torch.nn.functional.interpolate(exact, size=tuple(size), mode="bicubic", antialias=True,
                                              align_corners=False)
    return resized.clamp(0, 1)


def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`resize_smooth` when gradients are wanted, else PIL's bicubic of the 8-bit copy (float32)."""
    return resize_smooth(images, size) if wanted(images) else resize_bicubic(images, size)


def place(scores: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """(B,) scores as `RewardFn` returns them: float32 on the CPU without grad; with grad, on the images' device,
    float32 (float64 for float64 images, so a finite-difference check is not limited by float32 rounding)."""
    if not wanted(images):
        return scores.float().cpu()
    return scores.to(images.device, torch.float64 if images.dtype == torch.float64 else torch.float32)
