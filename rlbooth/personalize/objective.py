"""What stage one regresses, by kind of model: a DDPM denoiser's noise (or v), or a flow model's velocity.

Both draw their timesteps from the batch's seeded generator (so a resumed run repeats them), turn
clean latents and noise into the denoiser's input, and score its prediction with the DreamBooth
split into an instance half and a prior half.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from rlbooth.personalize.flow_loss import (Density, FlowTrainingGrid, flow_loss, noisy_latents, prediction_and_target,
                                           sample_density)
from rlbooth.personalize.loss import dreambooth_loss

if TYPE_CHECKING:
    from rlbooth.config import PersonalizeConfig
    from rlbooth.families import Family


class Objective(Protocol):
    def draw(self, n: int, generator: torch.Generator) -> Tensor:
        """n training-timestep indices."""

    def inputs(self, latents: Tensor, noise: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        """The denoiser's noisy input and timesteps."""

    def loss(self, pred: Tensor, latents: Tensor, noise: Tensor, index: Tensor, with_prior: bool
             ) -> tuple[Tensor, dict[str, Tensor]]:
        ...


class DenoisingObjective:
    """DDPM: uniform integer timesteps, noise (or v) target, optional Min-SNR on the instance half."""

    def __init__(self, scheduler_config: Any, cfg: "PersonalizeConfig") -> None:
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler.from_config(scheduler_config)
        self.cfg = cfg

    def draw(self, n: int, generator: torch.Generator) -> Tensor:
        return torch.randint(0, self.scheduler.config.num_train_timesteps, (n,), generator=generator)

    def inputs(self, latents: Tensor, noise: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        return self.scheduler.add_noise(latents, noise, index), index

    def loss(self, pred: Tensor, latents: Tensor, noise: Tensor, index: Tensor, with_prior: bool
             ) -> tuple[Tensor, dict[str, Tensor]]:
        prediction_type = self.scheduler.config.prediction_type
        target = noise if prediction_type == "epsilon" else self.scheduler.get_velocity(latents, noise, index)
        return dreambooth_loss(pred, target, index, with_prior=with_prior, prior_loss_weight=self.cfg.prior_loss_weight,
                               snr_gamma=self.cfg.snr_gamma, alphas_cumprod=self.scheduler.alphas_cumprod,
                               prediction_type=prediction_type)


class FlowObjective:
    """Flow matching: grid indices drawn through `timestep_density` (null: `density`, the family script's),
    x_s = (1 - s) x0 + s eps, velocity target (or x0 with `precondition_outputs`)."""

    def __init__(self, scheduler: Any, cfg: "PersonalizeConfig", density: Density) -> None:
        self.grid = FlowTrainingGrid.of(scheduler)
        self.cfg = cfg
        self.density = cfg.timestep_density or density

    def draw(self, n: int, generator: torch.Generator) -> Tensor:
        cfg = self.cfg
        u = sample_density(self.density, n, logit_mean=cfg.logit_mean, logit_std=cfg.logit_std,
                           mode_scale=cfg.mode_scale, generator=generator)
        return self.grid.indices(u)

    def inputs(self, latents: Tensor, noise: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        timesteps, sigmas = self.grid.at(index)
        return noisy_latents(latents, noise, sigmas), timesteps.to(latents.device)

    def loss(self, pred: Tensor, latents: Tensor, noise: Tensor, index: Tensor, with_prior: bool
             ) -> tuple[Tensor, dict[str, Tensor]]:
        _, sigmas = self.grid.at(index)
        pred, target = prediction_and_target(pred, latents, noise, sigmas, self.cfg.precondition_outputs)
        return flow_loss(pred, target, sigmas, weighting=self.cfg.flow_loss_weighting,
                         with_prior=with_prior, prior_loss_weight=self.cfg.prior_loss_weight)


def objective_for(family: "Family", pipe: Any, cfg: "PersonalizeConfig") -> Objective:
    if family.flow_matching:
        return FlowObjective(pipe.scheduler, cfg, family.script_timestep_density)
    return DenoisingObjective(pipe.scheduler.config, cfg)
