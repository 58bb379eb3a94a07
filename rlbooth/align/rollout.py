"""Sampling denoising trajectories with the log-probability of every step (the policy's actions)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor

from rlbooth.align.policy import StepPolicy
from rlbooth.families import Conditioning, Family
from rlbooth.families.base import decode_latents, from_latents
from rlbooth.files import kill_point


def guided_noise(family: Family, unet: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor,
                 cond: Conditioning, guidance_scale: float, detach_uncond: bool = False) -> torch.Tensor:
    """Classifier-free guidance in one batched forward; `cond` is `guidance_inputs`' (2B rows, unconditional
    ones first). A guidance-distilled family (FLUX.1-dev) has B rows and takes the scale as an input. B rows
    on a CFG family give the conditional prediction alone (DiffusionNFT's guidance-free sampling and training).

    `detach_uncond` keeps the value and drops the unconditional branch's gradient (align.detach_uncond):
    with one LoRA in both branches that gradient enters with weight 1 - guidance_scale.
    """
    batch = latents.shape[0]
    timesteps = timesteps.expand(batch) if timesteps.ndim == 0 else timesteps
    if not family.classifier_free_guidance or len(cond) == batch:
        return family.denoise(unet, latents, timesteps, family.with_guidance(cond, guidance_scale)).float()
    out = family.denoise(unet, torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), cond)
    uncond, guided = out.float().chunk(2)
    uncond = uncond.detach() if detach_uncond else uncond
    return family.guide(uncond, guided, guidance_scale)


def guidance_inputs(family: Family, uncond: Conditioning, cond: Conditioning) -> Conditioning:
    """The rows `guided_noise` runs: unconditional then conditional for CFG, the conditional ones alone for a
    guidance-distilled family (no unconditional batch is built, nor moved, per step)."""
    return Conditioning.guided(uncond, cond) if family.classifier_free_guidance else cond


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
def sample_rollout(family: Family, unet: torch.nn.Module, policy: StepPolicy, cond: Conditioning,
                   generators: list[torch.Generator], latent_shape: tuple[int, ...], *, num_steps: int,
                   guidance_scale: float, start_generators: list[torch.Generator] | None = None) -> Rollout:
    """Sample B trajectories; sample i depends only on generators[i], never on the batch it shares.

    x_T is drawn from `start_generators` when given (else from `generators`), so that trajectories
    can share a start and differ only in their steps.
    """
    device = cond.hidden.device
    timesteps = policy.set_timesteps(num_steps, device=device)
    latents = randn_tensor((len(generators), *latent_shape), generator=start_generators or generators,
                           device=device, dtype=torch.float32)
    latents = latents * policy.init_noise_sigma
    trajectory, log_probs = [latents], []
    for i, t in enumerate(timesteps):
        noise = guided_noise(family, unet, latents, t, cond, guidance_scale)
        latents, log_prob = policy.step(noise, torch.tensor(i), latents, generator=generators)
        trajectory.append(latents)
        log_probs.append(log_prob)
    kill_point("rollout")
    return Rollout(torch.stack(trajectory, dim=1), torch.stack(log_probs, dim=1), timesteps.clone())


@torch.no_grad()
def decode(vae: torch.nn.Module, latents: torch.Tensor, slice_size: int = 0) -> torch.Tensor:
    """Latents to images in [0, 1], float32; `slice_size` rows per VAE call (0: all at once)."""
    if slice_size and len(latents) > slice_size:
        return torch.cat([to_images(vae, part) for part in latents.split(slice_size)])
    return to_images(vae, latents)


def to_images(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """`decode` with gradients to the latents where grad mode is on (reward feedback learning)."""
    param = next(vae.parameters())
    images = decode_latents(vae, from_latents(vae, latents).to(param.dtype))
    return (images.float() / 2 + 0.5).clamp(0, 1)
