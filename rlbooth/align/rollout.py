"""Sampling denoising trajectories with the log-probability of every step (the policy's actions)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor

from rlbooth.align.ddim import ddim_step_with_logprob
from rlbooth.families import Conditioning, Family
from rlbooth.files import kill_point


def guided_noise(family: Family, unet: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor,
                 cond: Conditioning, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance in one batched forward; `cond` has 2B rows, unconditional ones first."""
    batch = latents.shape[0]
    timesteps = timesteps.expand(batch) if timesteps.ndim == 0 else timesteps
    out = family.denoise(unet, torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), cond)
    uncond, guided = out.float().chunk(2)
    return uncond + guidance_scale * (guided - uncond)


def cfg_embeds(uncond: Conditioning, cond: Conditioning) -> Conditioning:
    """Stack per-sample unconditional and conditional inputs as `guided_noise` expects."""
    return Conditioning.guided(uncond, cond)


@dataclass
class Rollout:
    """One batch of trajectories: latents x_T..x_0 (B, T+1, C, H, W), log p of each step (B, T), timesteps (T,)."""

    latents: torch.Tensor
    log_probs: torch.Tensor
    timesteps: torch.Tensor

    @property
    def final(self) -> torch.Tensor:
        return self.latents[:, -1]


@torch.no_grad()
def sample_rollout(family: Family, unet: torch.nn.Module, scheduler: DDIMScheduler, cond: Conditioning,
                   generators: list[torch.Generator], latent_shape: tuple[int, ...], *, num_steps: int,
                   guidance_scale: float, eta: float,
                   start_generators: list[torch.Generator] | None = None) -> Rollout:
    """Sample B trajectories; sample i depends only on generators[i], never on the batch it shares.

    x_T is drawn from `start_generators` when given (else from `generators`), so that trajectories
    can share a start and differ only in their steps.
    """
    device = cond.hidden.device
    scheduler.set_timesteps(num_steps, device=device)
    latents = randn_tensor((len(generators), *latent_shape), generator=start_generators or generators,
                           device=device, dtype=torch.float32)
    latents = latents * scheduler.init_noise_sigma
    trajectory, log_probs = [latents], []
    for t in scheduler.timesteps:
        noise = guided_noise(family, unet, latents, t, cond, guidance_scale)
        latents, log_prob = ddim_step_with_logprob(scheduler, noise, t, latents, eta=eta, generator=generators)
        trajectory.append(latents)
        log_probs.append(log_prob)
    kill_point("rollout")
    return Rollout(torch.stack(trajectory, dim=1), torch.stack(log_probs, dim=1), scheduler.timesteps.clone())


@torch.no_grad()
def decode(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Latents to images in [0, 1], float32."""
    param = next(vae.parameters())
    images = vae.decode(latents.to(param.dtype) / vae.config.scaling_factor).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)
