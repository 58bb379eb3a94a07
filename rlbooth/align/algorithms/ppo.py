"""DDPO (DDPM families) and Flow-GRPO (flow families): the importance-clipped PPO objective over stored
trajectories, sampled by the stochastic sampler whose steps have log-probabilities."""

from __future__ import annotations

from typing import Any

import torch

from rlbooth.align.algorithms.base import Algorithm
from rlbooth.align.policy import policy_for
from rlbooth.align.ppo import ppo_clip_loss
from rlbooth.align.rollout import guidance_inputs, guided_noise


class PPO(Algorithm):
    name = "ppo"

    def __init__(self, trainer: Any) -> None:
        super().__init__(trainer)
        self.policy = policy_for(trainer.family, trainer.pipe, trainer.cfg, trainer.latent_shape[1:])

    def summary(self, logs: dict[str, Any]) -> str:
        return f"approx_kl {logs['approx_kl']:.2e}, clipfrac {logs['clipfrac']:.3f}"

    def step_log_prob(self, samples: Any, rows: torch.Tensor, step: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Guided noise and log-prob of stored steps `step` of trajectories `rows` under the current weights."""
        t = self.trainer
        x_t = samples.latents[rows, step]
        timestep = samples.timesteps[step]
        inputs = guidance_inputs(t.family, t.uncond, samples.embeds[rows])
        with t.acc.autocast():
            noise = guided_noise(t.family, t.unet, x_t, timestep, inputs, t.cfg.guidance_scale, t.cfg.detach_uncond)
        _, log_prob = self.policy.step(noise, step, x_t, prev_sample=samples.latents[rows, step + 1])
        return noise, log_prob

    def loss(self, samples: Any, rows: torch.Tensor, step: torch.Tensor, advantages: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One PPO term: the clipped surrogate of stored steps, plus the KL to stage one (align.kl_coef)."""
        cfg = self.trainer.cfg
        noise, log_prob = self.step_log_prob(samples, rows, step)
        loss, info = ppo_clip_loss(log_prob, samples.log_probs[rows, step], advantages, cfg.clip_range)
        if cfg.kl_coef > 0:
            kl = self.kl_to_stage_one(noise, samples, rows, step)
            loss = loss + cfg.kl_coef * kl
            info["kl_stage_one"] = kl.detach()
        return loss, info

    def kl_to_stage_one(self, noise: torch.Tensor, samples: Any, rows: torch.Tensor, step: torch.Tensor
                        ) -> torch.Tensor:
        """KL of this step's Gaussian to stage one's: the same forward with the adapter switched off."""
        t = self.trainer
        x_t, timestep = samples.latents[rows, step], samples.timesteps[step]
        inputs = guidance_inputs(t.family, t.uncond, samples.embeds[rows])
        with t.adapters_off() as unet:
            ref_noise = guided_noise(t.family, unet, x_t, timestep, inputs, t.cfg.guidance_scale)
        mean, std = self.policy.mean_std(noise, step, x_t)
        ref_mean, _ = self.policy.mean_std(ref_noise, step, x_t)
        return self.policy.kl(mean, ref_mean, std, step).mean()
