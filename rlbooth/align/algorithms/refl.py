"""Reward feedback learning (ReFL, from the ImageReward paper; DRaFT-K, Clark et al. 2023): the reward's own
gradient, backpropagated through the VAE decoder into the denoiser.

Sampling runs the family's deterministic sampler (DDIM at eta 0, the flow Euler ODE) without gradients and keeps
the trajectories. Training restarts each one at a step drawn from a late window (align.refl_window, keyed by
(seed, epoch, pass, sample) like every draw, so a resumed run repeats), runs align.refl_backprop_steps steps
with gradients, the last of them the family's one-step x0 prediction, decodes it with the VAE, scores it with
the composite reward's differentiable path, and minimizes minus the weighted reward (or ReFL's shaping
relu(margin - r)), optionally plus stage one's denoising loss on the subject photos (align.refl_pretrain_weight).
With the sampling and the gradient step in the same epoch, the restart point is what the
current weights sampled, up to the optimizer steps the epoch has already taken.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor

from rlbooth.align.algorithms.base import Algorithm
from rlbooth.align.policy import ode_policy_for
from rlbooth.align.rollout import guidance_inputs, guided_noise, to_images
from rlbooth.families import Conditioning


def refl_loss(total: Tensor, shaping: str, margin: float) -> Tensor:
    """The mean loss of the weighted rewards `total` (B,): -r, or ReFL's relu(margin - r)."""
    if shaping == "relu":
        return torch.relu(margin - total).mean()
    if shaping != "linear":
        raise ValueError(f"ReFL shaping must be linear or relu, got {shaping!r}")
    return -total.mean()


class PretrainLoss:
    """Stage one's denoising loss on the subject photos (ReFL's and ID-Aligner's regularizer), with stage one's
    objective, data and instance prompt as its config recorded them; one photo, noise and timestep per trained
    sample, keyed by the sample, so the draws do not depend on how samples are split over processes."""

    def __init__(self, trainer: Any) -> None:
        from rlbooth.config import PersonalizeConfig, from_dict
        from rlbooth.images import check_images
        from rlbooth.personalize.objective import objective_for
        from rlbooth.personalize.train import PromptInputs, build_data

        t = trainer
        recorded = from_dict(PersonalizeConfig, t.stage_one.metadata["config"]["personalize"], "personalize.")
        cfg = dataclasses.replace(recorded, train_batch_size=1)
        self.trainer, self.cfg = t, cfg
        self.objective = objective_for(t.family, t.pipe, cfg)
        self.data = build_data(t.pipe, cfg, t.seed, check_images(t.subject.images, cfg.resolution), None,
                               self.objective)
        self.prompts = PromptInputs.build(t.pipe, t.family, False, t.subject.prompt(cfg.instance_prompt), None)

    def __call__(self, keys: list[int]) -> Tensor:
        """The loss of one photo per key, with gradients to the LoRA."""
        t, family = self.trainer, self.trainer.family
        rows = [self.data.batch(key) for key in keys]
        latents, noise, index = (torch.cat([getattr(b, name) for b in rows]).to(t.acc.device)
                                 for name in ("latents", "noise", "timesteps"))
        geometry = torch.cat([b.geometry for b in rows])
        cond = family.with_geometry(self.prompts.conditioning([], len(latents)).to(t.acc.device), geometry)
        noisy, timesteps = self.objective.inputs(latents, noise, index)
        with t.acc.autocast():
            pred = family.denoise(t.unet, noisy, timesteps, family.with_guidance(cond, self.cfg.training_guidance))
        return self.objective.loss(pred.float(), latents, noise, index, with_prior=False)[0]


class ReFL(Algorithm):
    name = "refl"

    def __init__(self, trainer: Any) -> None:
        super().__init__(trainer)
        self.policy = ode_policy_for(trainer.family, trainer.pipe, trainer.latent_shape[1:])
        self.pretrain = PretrainLoss(trainer) if trainer.cfg.refl_pretrain_weight > 0 else None

    def summary(self, logs: dict[str, Any]) -> str:
        return f"refl_reward {logs['refl_reward']:.4f}"

    def _output(self, x_t: Tensor, timestep: Tensor, inputs: Conditioning) -> Tensor:
        """The guided model output with gradients to the trained LoRA."""
        t = self.trainer
        with t.acc.autocast():
            return guided_noise(t.family, t.unet, x_t, timestep, inputs, t.cfg.guidance_scale, t.cfg.detach_uncond)

    def predicted_x0(self, samples: Any, x_t: Tensor, step: Tensor, inputs: Conditioning) -> tuple[Tensor, Tensor]:
        """From x_t at step(s) `step`: refl_backprop_steps - 1 sampler steps, then the x0 prediction, all with
        gradients (each forward recomputed in the backward pass when there are several). Returns x0 and the
        model output at the drawn step (for the KL term)."""
        k = self.trainer.cfg.refl_backprop_steps
        forward = partial(torch.utils.checkpoint.checkpoint, self._output, use_reentrant=False) if k > 1 \
            else self._output
        first = output = forward(x_t, samples.timesteps[step], inputs)
        x = x_t
        for _ in range(k - 1):
            x = self.policy.step(output, step, x)[0].float()
            step = step + 1
            output = forward(x, samples.timesteps[step], inputs)
        return self.policy.predict_x0(output, step, x), first

    def loss(self, samples: Any, rows: Tensor, step: Tensor, advantages: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Minus the weighted differentiable reward of the decoded x0 prediction (advantages are not read)."""
        t, cfg = self.trainer, self.trainer.cfg
        inputs = guidance_inputs(t.family, t.uncond, samples.embeds[rows])
        x_t = samples.latents[rows, step].float()
        x0, output = self.predicted_x0(samples, x_t, step, inputs)
        images = to_images(t.pipe.vae, x0)
        prompts = [t.prompt(t.pass_key[0], int(i)) for i in samples.indices[rows.cpu()]]
        total, _ = t.reward.differentiable_total(images, [p.text for p in prompts], t.metadata(prompts))
        loss = refl_loss(total, cfg.refl_shaping, cfg.refl_relu_margin)
        info = {"refl_reward": total.detach().mean()}
        if self.pretrain is not None:
            epoch, inner = t.pass_key
            pretrain = self.pretrain([hash((epoch, inner, int(i))) % 2**62 for i in samples.indices[rows.cpu()]])
            loss = loss + cfg.refl_pretrain_weight * pretrain
            info["pretrain_loss"] = pretrain.detach()
        if cfg.kl_coef > 0:
            with t.adapters_off() as unet:
                ref_output = guided_noise(t.family, unet, x_t, samples.timesteps[step], inputs, cfg.guidance_scale)
            kl = ((output - ref_output) ** 2).mean(dim=tuple(range(1, x_t.ndim))).mean()
            loss = loss + cfg.kl_coef * kl
            info["kl_stage_one"] = kl.detach()
        return loss, info
