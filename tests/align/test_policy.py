"""Stage two's step policies: DDIM as the DDIM step, the flow SDE as Flow-GRPO's step, ODE outside its window."""

from __future__ import annotations

import pytest
import torch

from rlbooth.align.ddim import ddim_step_with_logprob
from rlbooth.align.flow import flow_step_with_logprob
from rlbooth.align.policy import DDIMPolicy, FlowSDEPolicy
from rlbooth.config import ModelConfig
from rlbooth.families import family_of
from rlbooth.models import load_pipeline


@pytest.fixture(scope="module")
def sd3():
    return load_pipeline(ModelConfig(pretrained="tiny", family="sd3"))


def test_ddim_policy_steps_by_index_as_ddim_steps_by_timestep():
    pipe_scheduler_config = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                             "set_alpha_to_one": False, "steps_offset": 1}
    from diffusers import DDIMScheduler

    policy = DDIMPolicy(DDIMScheduler.from_config(pipe_scheduler_config), eta=1.0)
    timesteps = policy.set_timesteps(5)
    x, out = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    step = torch.tensor([0, 2, 4])
    prev, log_prob = policy.step(out, step, x, generator=torch.Generator().manual_seed(0))
    ref_prev, ref_log_prob = ddim_step_with_logprob(policy.scheduler, out, timesteps[step], x, eta=1.0,
                                                    generator=torch.Generator().manual_seed(0))
    assert torch.equal(prev, ref_prev) and torch.equal(log_prob, ref_log_prob)


def test_flow_policy_is_the_sde_inside_its_window_and_euler_outside(sd3):
    family = family_of(sd3)
    policy = FlowSDEPolicy(family, sd3, (16, 16), noise_level=0.7, sde_steps=[0, 1, 2])
    timesteps = policy.set_timesteps(6)
    assert torch.equal(timesteps, family.set_timesteps(sd3, family.flow_scheduler(sd3), 6, (16, 16)))
    x, v = torch.randn(2, 16, 16, 16), torch.randn(2, 16, 16, 16)

    prev, log_prob = policy.step(v, torch.tensor(1), x, generator=torch.Generator().manual_seed(0))
    sigmas = policy.scheduler.sigmas
    ref, ref_log_prob = flow_step_with_logprob(v, x, sigmas[1], sigmas[2], noise_level=0.7,
                                               sigma_max=policy.sigma_max,
                                               generator=torch.Generator().manual_seed(0))
    assert torch.equal(prev, ref) and torch.equal(log_prob, ref_log_prob)

    euler = family.flow_scheduler(sd3)
    family.set_timesteps(sd3, euler, 6, (16, 16))
    ode, zero = policy.step(v, torch.tensor(4), x)
    torch.testing.assert_close(ode, euler.step(v, euler.timesteps[4], x).prev_sample)
    assert torch.equal(zero, torch.zeros(2))


def test_flow_policy_first_step_is_finite_under_flow_grpos_noise(sd3):
    policy = FlowSDEPolicy(family_of(sd3), sd3, (16, 16), noise_level=0.7)
    policy.set_timesteps(4)
    assert policy.sigmas[0] == 1.0
    mean, std = policy.mean_std(torch.randn(1, 16, 4, 4), torch.tensor([0]), torch.randn(1, 16, 4, 4))
    assert torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()


def test_the_ode_sampler_stays_the_euler_ode_in_the_trained_window(sd3):
    """NFT's and ReFL's deterministic sampler: the loop sets each epoch's trained window on the policy, which
    turned the window's steps into SDE steps at noise level 1 (found in review, 2026-12-06); it must not."""
    from rlbooth.align.policy import ode_policy_for

    family = family_of(sd3)
    policy = ode_policy_for(family, sd3, (16, 16))
    policy.set_timesteps(6)
    policy.use_window([0, 1, 2, 3])
    x, v = torch.randn(2, 16, 16, 16), torch.randn(2, 16, 16, 16)
    euler = family.flow_scheduler(sd3)
    family.set_timesteps(sd3, euler, 6, (16, 16))
    for step in range(6):
        a, _ = policy.step(v, torch.tensor(step), x, generator=torch.Generator().manual_seed(0))
        b, log_prob = policy.step(v, torch.tensor(step), x, generator=torch.Generator().manual_seed(1))
        assert torch.equal(a, b) and torch.equal(log_prob, torch.zeros(2)), step
        torch.testing.assert_close(a, euler.step(v, euler.timesteps[step], x).prev_sample)
