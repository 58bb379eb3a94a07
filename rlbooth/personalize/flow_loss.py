"""Stage one's flow-matching objective, as diffusers' SD3 / FLUX DreamBooth-LoRA scripts train.

A timestep is drawn through a density on u in [0, 1) and indexes the scheduler's training grid (so the
grid's shift applies: SD3's static shift 3; FLUX's dynamic shift is resolution-dependent and used only
when sampling, so it trains on the unshifted grid). The input is x_s = (1 - s) x0 + s eps at that grid
point's sigma s, the target the velocity eps - x0, and the per-image squared error may be weighted by s.

The scripts' one `weighting_scheme` chooses the density (`logit_normal`, `mode`; anything else uniform)
and the weighting (`sigma_sqrt`, `cosmap`; anything else none) at once; here they are two choices, and the
scripts' setting `sigma_sqrt` is `density="uniform", weighting="sigma_sqrt"`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

Density = Literal["logit_normal", "mode", "uniform"]
Weighting = Literal["none", "sigma_sqrt", "cosmap"]


@dataclass(frozen=True)
class FlowTrainingGrid:
    """The scheduler's training grid: `timesteps` (N,) descending, = `sigmas` * N, the shift applied."""

    timesteps: Tensor
    sigmas: Tensor

    @classmethod
    def of(cls, scheduler: Any) -> "FlowTrainingGrid":
        """From the scheduler's config, so a scheduler already set for sampling gives the same grid."""
        fresh = type(scheduler).from_config(scheduler.config)
        return cls(fresh.timesteps.clone(), fresh.sigmas.clone())

    def __len__(self) -> int:
        return len(self.timesteps)

    def indices(self, u: Tensor) -> Tensor:
        """Grid indices of draws u in [0, 1), as the scripts index (u * N, floored); the `mode` density's
        u = 1 (at a raw draw of 0) is clamped to the last index instead of running off the grid."""
        return (u * len(self)).long().clamp(0, len(self) - 1)

    def at(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """The timesteps (the denoiser's input, sigma * N) and sigmas at `indices`."""
        indices = indices.cpu()
        return self.timesteps[indices], self.sigmas[indices]


def sample_density(density: Density, batch_size: int, *, logit_mean: float = 0.0, logit_std: float = 1.0,
                   mode_scale: float = 1.29, generator: torch.Generator | None = None) -> Tensor:
    """Draws u in [0, 1) (float32, on the CPU): `logit_normal` is sigmoid(N(mean, std)), which favours the
    middle of the schedule (SD3's default); `mode` bends a uniform draw towards the middle by `mode_scale`
    (0: uniform); `uniform` is U[0, 1). Same draws as diffusers' for the same generator."""
    if density == "logit_normal":
        return torch.sigmoid(torch.normal(logit_mean, logit_std, size=(batch_size,), generator=generator))
    if density not in ("mode", "uniform"):
        raise ValueError(f"timestep density must be 'logit_normal', 'mode' or 'uniform', got {density!r}")
    u = torch.rand(batch_size, generator=generator)
    if density == "uniform":
        return u
    return 1 - u - mode_scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)


def _per_row(sigmas: Tensor, like: Tensor) -> Tensor:
    return sigmas.to(like.device, like.dtype).reshape(-1, *[1] * (like.ndim - 1))


def noisy_latents(latents: Tensor, noise: Tensor, sigmas: Tensor) -> Tensor:
    """x_s = (1 - s) x0 + s eps, one sigma per row."""
    s = _per_row(sigmas, latents)
    return (1 - s) * latents + s * noise


def velocity_target(latents: Tensor, noise: Tensor) -> Tensor:
    """What the flow model predicts: d x_s / d s = eps - x0."""
    return noise - latents


def prediction_and_target(model_pred: Tensor, latents: Tensor, noise: Tensor, sigmas: Tensor, precondition: bool
                          ) -> tuple[Tensor, Tensor]:
    """What the loss compares: the velocity and eps - x0; or, preconditioned (diffusers' SD3 script's
    `--precondition_outputs`, its default), the x0 prediction x_s - s v and x0, whose squared error is the
    velocity's times s^2 per image (low-noise steps count less)."""
    if not precondition:
        return model_pred, velocity_target(latents, noise)
    noisy = noisy_latents(latents, noise, sigmas)
    return noisy - _per_row(sigmas, noisy) * model_pred.to(noisy.dtype), latents


def loss_weights(weighting: Weighting, sigmas: Tensor) -> Tensor:
    """Per-row weights of the squared error (float32): `sigma_sqrt` is 1 / s^2; `cosmap` is
    2 / (pi (1 - 2 s + 2 s^2)), the SD3 paper's cosine-map density as a weight; `none` is 1."""
    sigmas = sigmas.float()
    if weighting == "none":
        return torch.ones_like(sigmas)
    if weighting == "sigma_sqrt":
        return sigmas**-2
    if weighting == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    raise ValueError(f"loss weighting must be 'none', 'sigma_sqrt' or 'cosmap', got {weighting!r}")


def _weighted_mse(pred: Tensor, target: Tensor, weights: Tensor) -> Tensor:
    per_row = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    return (weights.to(per_row.device) * per_row).mean()


def flow_loss(model_pred: Tensor, target: Tensor, sigmas: Tensor, *, weighting: Weighting = "none",
              with_prior: bool, prior_loss_weight: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss on a batch whose first half is instance images and second half class images (when `with_prior`).

    Each half is weighted by its own rows' sigmas, as diffusers' scripts do since #13743 (May 2026: they chunk
    the weighting with the batch; before, they multiplied the B instance rows by all 2B weights).
    """
    weights = loss_weights(weighting, sigmas)
    if not with_prior:
        loss = _weighted_mse(model_pred, target, weights)
        return loss, {"instance_loss": loss.detach()}
    (pred_inst, pred_prior), (target_inst, target_prior) = model_pred.chunk(2), target.chunk(2)
    weights_inst, weights_prior = weights.chunk(2)
    instance = _weighted_mse(pred_inst, target_inst, weights_inst)
    prior = _weighted_mse(pred_prior, target_prior, weights_prior)
    loss = instance + prior_loss_weight * prior
    return loss, {"instance_loss": instance.detach(), "prior_loss": prior.detach()}
