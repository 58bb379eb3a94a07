"""The DreamBooth objective: instance loss (optionally Min-SNR weighted) plus weighted prior-preservation loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep."""
    alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alpha_bar / (1.0 - alpha_bar)


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for epsilon or v targets."""
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    return clipped / snr


def _mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))
    return (per_sample * weights).mean()


def dreambooth_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    with_prior: bool,
    prior_loss_weight: float,
    snr_gamma: float | None = None,
    alphas_cumprod: torch.Tensor | None = None,
    prediction_type: str = "epsilon",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss on a batch whose first half is instance images and second half class images (when `with_prior`).

    Min-SNR weights only the instance loss, with the instance timesteps (the diffusers script weighted
    B losses with 2B timesteps); the prior loss stays plain MSE, as in diffusers' DreamBooth script, so
    `prior_loss_weight` keeps its meaning whether or not `snr_gamma` is set.
    """
    weights = None
    if snr_gamma is not None:
        if alphas_cumprod is None:
            raise ValueError("Min-SNR weighting needs the scheduler's alphas_cumprod")
        weights = min_snr_weights(compute_snr(alphas_cumprod, timesteps), snr_gamma, prediction_type)
    if not with_prior:
        loss = _mse(model_pred, target, weights)
        return loss, {"instance_loss": loss.detach()}
    pred_inst, pred_prior = model_pred.chunk(2)
    target_inst, target_prior = target.chunk(2)
    instance = _mse(pred_inst, target_inst, weights.chunk(2)[0] if weights is not None else None)
    prior = _mse(pred_prior, target_prior, None)
    loss = instance + prior_loss_weight * prior
    return loss, {"instance_loss": instance.detach(), "prior_loss": prior.detach()}
