"""Flow-GRPO's SDE step against diffusers' Euler step and the analytic Gaussian density."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from rlbooth.align.flow import flow_mean_std, flow_step_with_logprob, noise_std


def schedule(steps: int = 6, shift: float = 3.0) -> FlowMatchEulerDiscreteScheduler:
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    return scheduler


@pytest.mark.parametrize("index", [0, 2, 5])
def test_mean_at_noise_level_zero_is_diffusers_euler_step(index):
    scheduler = schedule()
    x, v = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    expected = scheduler.step(v, scheduler.timesteps[index], x).prev_sample
    mean, _ = flow_mean_std(v, x, scheduler.sigmas[index], scheduler.sigmas[index + 1], noise_level=0.0)
    torch.testing.assert_close(mean, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("schedule_name", ["flow_grpo", "constant"])
def test_log_prob_is_the_gaussian_density_averaged_over_the_latent(schedule_name):
    scheduler = schedule()
    x, v = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    sigma, sigma_next = scheduler.sigmas[1], scheduler.sigmas[2]
    prev, log_prob = flow_step_with_logprob(v, x, sigma, sigma_next, noise_level=0.7, schedule=schedule_name,
                                            generator=torch.Generator().manual_seed(0))
    mean, std = flow_mean_std(v, x, sigma, sigma_next, noise_level=0.7, schedule=schedule_name)
    expected = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(prev).mean(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob, expected)
    # Scoring the stored step later gives the value recorded when it was drawn.
    _, again = flow_step_with_logprob(v, x, sigma, sigma_next, noise_level=0.7, schedule=schedule_name,
                                      prev_sample=prev)
    torch.testing.assert_close(again, log_prob, rtol=0, atol=0)


def test_drawn_steps_have_the_stated_mean_and_std():
    x, v = torch.randn(1, 4, 16, 16).expand(4000, 4, 16, 16), torch.randn(1, 4, 16, 16).expand(4000, 4, 16, 16)
    sigma, sigma_next = torch.tensor(0.6), torch.tensor(0.45)
    prev, _ = flow_step_with_logprob(v, x, sigma, sigma_next, noise_level=0.7,
                                     generator=torch.Generator().manual_seed(1))
    mean, std = flow_mean_std(v[:1], x[:1], sigma, sigma_next, noise_level=0.7)
    expected_std = 0.7 * (0.6 / 0.4) ** 0.5 * 0.15 ** 0.5
    assert std.item() == pytest.approx(expected_std)
    torch.testing.assert_close(prev.mean(dim=0), mean[0], rtol=0, atol=4 * expected_std / 4000 ** 0.5)
    assert prev.std(dim=0).mean().item() == pytest.approx(expected_std, rel=0.02)


def test_flow_grpo_noise_is_finite_at_the_first_step_and_the_constant_one_is_constant():
    sigmas = schedule().sigmas[:-1]
    flow = noise_std(sigmas, 0.7, "flow_grpo", sigma_max=float(sigmas[1]))
    assert torch.isfinite(flow).all()
    assert flow[0].item() == pytest.approx(flow[1].item() / sigmas[1].item() ** 0.5)  # 1 - sigma_max stands in
    assert torch.equal(noise_std(sigmas, 0.3, "constant", 0.98), torch.full_like(sigmas, 0.3))


def test_per_sample_steps_match_one_step_at_a_time():
    """Training replays each trajectory at its own step."""
    scheduler = schedule()
    x, v = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    idx = torch.tensor([0, 3, 4])
    mean, std = flow_mean_std(v, x, scheduler.sigmas[idx], scheduler.sigmas[idx + 1], noise_level=0.7)
    for row, i in enumerate(idx):
        m, s = flow_mean_std(v[row:row + 1], x[row:row + 1], scheduler.sigmas[i], scheduler.sigmas[i + 1],
                             noise_level=0.7)
        torch.testing.assert_close(mean[row:row + 1], m)
        torch.testing.assert_close(std[row:row + 1], s)


def test_bad_inputs_are_refused():
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="noise_level"):
        flow_step_with_logprob(x, x, torch.tensor(0.5), torch.tensor(0.4), noise_level=0.0)
    with pytest.raises(ValueError, match="smaller"):
        flow_mean_std(x, x, torch.tensor(0.4), torch.tensor(0.5), noise_level=0.7)
    with pytest.raises(ValueError, match="schedule"):
        flow_mean_std(x, x, torch.tensor(0.5), torch.tensor(0.4), noise_level=0.7, schedule="linear")


# Sampling sigmas at 10 steps, written out: SD3's static shift 3, and FLUX's dynamic shift at 512 px
# (image_seq_len 1024, mu 0.63) on FLUX's sigmas linspace(1, 1/10, 10).
SD3_SIGMAS = [1.0, 0.960129, 0.913349, 0.857692, 0.790368, 0.707278, 0.602151, 0.464876, 0.278049, 0.008929, 0.0]
FLUX_SIGMAS = [1.0, 0.944129, 0.882497, 0.814164, 0.737974, 0.652489, 0.555899, 0.445888, 0.319451, 0.172612, 0.0]


def flow_grpo_sde_step(x, v, prev, sigma, sigma_prev, sigma_max, noise_level):
    """Flow-GRPO's `sde_step_with_logprob` (its 'sde' type), transcribed in float64 in its own arrangement."""
    dt = sigma_prev - sigma
    std_dev_t = math.sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma))) * noise_level
    mean = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    std = std_dev_t * math.sqrt(-dt)
    log_prob = -((prev - mean) ** 2) / (2 * std**2) - math.log(std) - math.log(math.sqrt(2 * math.pi))
    return mean, std, log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


@pytest.mark.parametrize("sigmas", [SD3_SIGMAS, FLUX_SIGMAS], ids=["sd3-shift3", "flux-dynamic"])
@pytest.mark.parametrize("index", [0, 4, 8, 9])
def test_sde_step_is_flow_grpos_at_noise_level_0_7(sigmas, index):
    """Mean, std and log-prob of a step against the transcription, where the drift's correction term is large."""
    gen = torch.Generator().manual_seed(index)
    x, v, prev = (torch.randn(2, 4, 3, 3, generator=gen, dtype=torch.float64) for _ in range(3))
    sigma, sigma_prev = sigmas[index], sigmas[index + 1]
    mean, std, log_prob = flow_grpo_sde_step(x, v, prev, sigma, sigma_prev, sigmas[1], 0.7)
    got_mean, got_std = flow_mean_std(v.float(), x.float(), torch.tensor(sigma), torch.tensor(sigma_prev),
                                      noise_level=0.7, sigma_max=sigmas[1])
    _, got_log_prob = flow_step_with_logprob(v.float(), x.float(), torch.tensor(sigma), torch.tensor(sigma_prev),
                                             noise_level=0.7, sigma_max=sigmas[1], prev_sample=prev.float())
    torch.testing.assert_close(got_mean.double(), mean, rtol=1e-5, atol=1e-5)
    assert got_std.flatten()[0].item() == pytest.approx(std, rel=1e-5)
    torch.testing.assert_close(got_log_prob.double(), log_prob, rtol=1e-4, atol=1e-4)
