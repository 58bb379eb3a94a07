"""Flow-GRPO's settings on the tiny SD3: rlbooth's loss terms and their gradients are Flow-GRPO's, step for step.

The expected values are a transcription of Flow-GRPO's `train_sd3.py` (compute_log_prob, its stat tracker
with global_std, the GRPO loss and the KL term) and `sde_step_with_logprob`, run on the same transformer.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rlbooth.align.steps import trained_steps
from tests.align.conftest import align_config
from tests.align.test_flow import flow_grpo_sde_step
from tests.align.test_train import make_trainer

FLOW_GRPO_SD3 = [
    "align.num_steps=10", "align.timestep_fraction=0.99", "align.train_step_selection=first",
    "align.guidance_scale=4.5", "align.flow_noise_level=0.7", "align.flow_noise_schedule=flow_grpo",
    "align.clip_range=1e-4", "align.adv_clip_max=5", "align.kl_form=flow_grpo", "align.kl_coef=0.04",
    "align.group_noise=independent", "align.group_std=rewards", "align.detach_uncond=false",
]
"""Flow-GRPO's SD3 settings as --set lines (README, rlbooth vs the references); samples_per_noise is its
num_image_per_prompt."""


def flow_grpo_advantages(prompts: list[str], rewards: np.ndarray, clip: float) -> np.ndarray:
    """Its PerPromptStatTracker(global_std=True), cleared every epoch, then clamped to +-adv_clip_max."""
    prompts_arr, advantages = np.array(prompts), np.zeros_like(rewards)
    for prompt in np.unique(prompts_arr):
        mine = prompts_arr == prompt
        advantages[mine] = (rewards[mine] - rewards[mine].mean()) / (np.std(rewards) + 1e-4)
    return np.clip(advantages, -clip, clip)


def flow_grpo_terms(trainer, samples, advantages: torch.Tensor, j: int, params: list[torch.Tensor]
                    ) -> tuple[dict[str, float], torch.Tensor]:
    """compute_log_prob with train.cfg, the GRPO loss and the KL term of `train_sd3.py` at step j, and the
    loss's gradient on `params` (flat)."""
    cfg, unet, n = trainer.cfg, trainer.acc.unwrap_model(trainer.unet), len(samples.indices)
    cond, neg = samples.embeds, trainer.uncond
    embeds = torch.cat([neg.hidden.expand(n, *neg.hidden.shape[1:]), cond.hidden])
    pooled = torch.cat([neg.added["pooled_projections"].expand(n, -1), cond.added["pooled_projections"]])
    sigmas = trainer.policy.scheduler.sigmas.double().tolist()  # diffusers' sampling sigmas

    def mean_and_log_prob():
        x, t = samples.latents[:, j], samples.timesteps[j].expand(n)
        pred = unet(hidden_states=torch.cat([x] * 2), timestep=torch.cat([t] * 2), encoder_hidden_states=embeds,
                    pooled_projections=pooled, return_dict=False)[0]
        uncond, text = pred.chunk(2)
        v = uncond + cfg.guidance_scale * (text - uncond)
        mean, _, log_prob = flow_grpo_sde_step(x.double(), v.double(), samples.latents[:, j + 1].double(),
                                               sigmas[j], sigmas[j + 1], sigmas[1], cfg.flow_noise_level)
        return mean, log_prob

    mean, log_prob = mean_and_log_prob()
    with torch.no_grad():
        unet.disable_adapters()
        try:
            ref_mean, _ = mean_and_log_prob()
        finally:
            unet.enable_adapters()
    adv = advantages.double()
    ratio = torch.exp(log_prob - samples.log_probs[:, j].double())
    policy_loss = torch.mean(torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - cfg.clip_range,
                                                                              1 + cfg.clip_range)))
    std_dev_t = math.sqrt(sigmas[j] / (1 - (sigmas[1] if sigmas[j] == 1 else sigmas[j]))) * cfg.flow_noise_level
    kl_loss = torch.mean(((mean - ref_mean) ** 2).mean(dim=(1, 2, 3)) / (2 * std_dev_t**2))
    loss = policy_loss + cfg.kl_coef * kl_loss
    grad = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
    with torch.no_grad():
        return {"loss": loss.item(), "kl_stage_one": kl_loss.item(),
                "approx_kl": (0.5 * torch.mean((log_prob - samples.log_probs[:, j].double()) ** 2)).item(),
                "clipfrac": torch.mean((torch.abs(ratio - 1.0) > cfg.clip_range).double()).item()}, grad


@pytest.mark.slow
def test_flow_grpo_settings_reproduce_its_loss_terms_step_for_step(stage_one_sd3, tmp_path):
    config = align_config(*FLOW_GRPO_SD3, "align.num_epochs=1", "align.sample_batch_size=4",
                          "align.num_batches_per_epoch=1", "align.train_batch_size=4", "align.samples_per_noise=2",
                          "align.identifier_ratio=1.0")
    trainer = make_trainer(config, stage_one_sd3, tmp_path)
    samples = trainer.sample_epoch(0)
    n = len(samples.indices)
    prompts = [trainer.prompt(0, int(i)).text for i in samples.indices]
    assert prompts[0] == prompts[1] and prompts[2] == prompts[3] and prompts[0] != prompts[2]
    assert not torch.equal(samples.latents[0, 0], samples.latents[1, 0])  # its groups: independent x_T

    advantages = trainer.advantages(0, samples)
    expected = flow_grpo_advantages(prompts, samples.rewards.double().numpy(), trainer.cfg.adv_clip_max)
    np.testing.assert_allclose(advantages.numpy(), expected, rtol=1e-5, atol=1e-6)
    # its train_timesteps = range(int(num_steps * timestep_fraction)), every sample
    steps = trained_steps(trainer.cfg, 0, samples.indices, lambda i: i)
    assert steps.tolist() == [list(range(int(10 * 0.99)))] * n

    gen = torch.Generator().manual_seed(0)  # move the zero-init LoRA off stage one, so ratio and KL are not trivial
    for name, p in trainer.denoiser.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.5
    rows, steps_per_update = torch.arange(n), int(10 * 0.99)
    for j in range(steps_per_update):
        expected, grad = flow_grpo_terms(trainer, samples, advantages, j, trainer.params)
        before = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in trainer.params]
        got = trainer.train_step(samples, rows, torch.full_like(rows, j), advantages)
        for key, value in expected.items():
            assert got[key].item() == pytest.approx(value, rel=1e-3, abs=1e-8), (j, key)
        if j < steps_per_update - 1:  # accumulated over the 9 steps (loss / 9 each), as Flow-GRPO accumulates
            added = torch.cat([(p.grad - b).flatten() for p, b in zip(trainer.params, before)])
            torch.testing.assert_close(added, grad.float() / steps_per_update, rtol=1e-3,
                                       atol=1e-4 * grad.abs().max().item())
