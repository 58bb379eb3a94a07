"""The resize every pretrained reward model was scored with: PIL's bicubic, on 8-bit images.

CLIP and PickScore (`CLIPImageProcessor`), ImageReward (torchvision's `Resize` on a PIL image) and
DINO's evaluation all resize a saved 8-bit image with PIL. PIL rounds to 8 bits at the end and
between its two passes, with fixed-point weights; torch's antialiased bicubic on floats uses the
same kernel without either rounding and lands 4-6 pixel levels off on a real photo (torch's uint8
path is still 1-2 off). So images are rounded to 8 bits as a saved image would be and resized by
PIL itself: exact whatever the Pillow version (13.0 changed which pass runs first). The batch is
rounded on its device and crosses to the CPU once, as uint8; PIL's resize (2-5 ms for a 256-512 px
image on one core, the GIL released) runs per image; the reward model's forward stays batched on its
device. A reimplementation of PIL's integer passes in torch was exact too, but ten times slower on
the CPU.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from rlbooth.rewards import RewardError


def to_8bit(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float in [0, 1] -> uint8 levels on the same device, rounded as a saved image is."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise RewardError(f"reward images must be a (B, 3, H, W) tensor, got {tuple(images.shape)}")
    return images.detach().float().mul(255).clamp_(0, 255).round_().to(torch.uint8)  # one temporary, in place


def resize_bicubic(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 3, H, W) float in [0, 1] -> (B, 3, height, width) float32 multiples of 1/255 on the input's device.

    PIL's BICUBIC (antialiased when shrinking) of each image's 8-bit copy; images already at `size`
    are only rounded to 8 bits, since the originals always score an 8-bit image.
    """
    height, width = size
    levels = to_8bit(images)
    if tuple(levels.shape[-2:]) != (height, width):
        rows = levels.permute(0, 2, 3, 1).contiguous().cpu().numpy()
        resized = np.stack([np.asarray(Image.fromarray(row).resize((width, height), Image.Resampling.BICUBIC))
                            for row in rows]) if len(rows) else np.zeros((0, height, width, 3), np.uint8)
        levels = torch.from_numpy(resized).to(images.device).permute(0, 3, 1, 2)
    return levels.float() / 255


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Per-channel (x - mean) / std, as the processors' Normalize."""
    mean_t = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - mean_t) / std_t
