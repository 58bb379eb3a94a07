"""Training data for stage one, encoded once: VAE latent distributions and (frozen encoder) prompt embeddings.

Batches are drawn from a generator seeded by (seed, micro-step, process), so a resumed run sees
exactly the batches, noise and timesteps an uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from rlbooth.families.base import latent_dist, tokenize  # noqa: F401  (token ids for one tokenizer, as stage one uses them)
from rlbooth.images import load_image_with_geometry


@dataclass
class LatentBank:
    """Per-image mean and std of the VAE posterior; a fresh latent is drawn from them every step."""

    mean: torch.Tensor
    std: torch.Tensor
    geometry: torch.Tensor
    """(N, 6) per image: original height, width, crop top, left, target height, width (SDXL's size input)."""

    def __len__(self) -> int:
        return self.mean.shape[0]

    def sample(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(self.mean[index].shape, generator=generator)
        return self.mean[index] + self.std[index] * noise


@torch.no_grad()
def encode_images(vae: torch.nn.Module, paths: list[Path], resolution: int, center_crop: bool, seed: int,
                  batch_size: int = 8, desc: str = "encoding") -> LatentBank:
    rng = np.random.default_rng(seed)
    means, stds, geometry = [], [], []
    param = next(vae.parameters())
    for start in tqdm(range(0, len(paths), batch_size), desc=desc, leave=False):
        loaded = [load_image_with_geometry(p, resolution, center_crop, rng) for p in paths[start:start + batch_size]]
        geometry += [g for _, g in loaded]
        pixels = np.stack([np.asarray(img, dtype=np.float32) for img, _ in loaded])
        pixels = torch.from_numpy(pixels).permute(0, 3, 1, 2) / 127.5 - 1.0
        dist = latent_dist(vae, pixels.to(param.device, param.dtype))
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    return LatentBank(torch.cat(means), torch.cat(stds), torch.tensor(geometry, dtype=torch.float32))


@dataclass
class Batch:
    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    geometry: torch.Tensor
    """(rows, 6) size conditioning of each row's image."""


@dataclass
class DreamBoothData:
    """Instance latents, and class latents when prior preservation is on."""

    instance: LatentBank
    prior: LatentBank | None
    scaling_factor: float | torch.Tensor
    """Multiplies the shifted latents; Qwen-Image's is per channel, (C, 1, 1)."""
    draw_timesteps: Callable[[int, torch.Generator], torch.Tensor]
    """n training timesteps from the batch's generator (the objective's density)."""
    batch_size: int
    seed: int
    shift_factor: float | torch.Tensor = 0.0
    """Subtracted before scaling (SD3's and FLUX's VAEs; Qwen-Image's per channel); 0 for SD."""

    def batch(self, micro_step: int, process_index: int = 0) -> Batch:
        """Instance rows first, then as many class rows: the loss splits the prediction in two halves."""
        g = torch.Generator().manual_seed(hash((self.seed, micro_step, process_index)) % 2**63)
        banks = [self.instance] + ([self.prior] if self.prior is not None else [])
        rows = []
        for bank in banks:  # index, then latents, bank by bank: the order of the seeded draws
            index = torch.randint(len(bank), (self.batch_size,), generator=g)
            rows.append((bank.sample(index, g), bank.geometry[index]))
        latents = (torch.cat([sampled for sampled, _ in rows]) - self.shift_factor) * self.scaling_factor
        noise = torch.randn(latents.shape, generator=g)
        timesteps = self.draw_timesteps(latents.shape[0], g)
        return Batch(latents, noise, timesteps, torch.cat([geometry for _, geometry in rows]))
