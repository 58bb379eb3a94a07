"""The switches that give Flow-GRPO's behaviour, each against a transcription of its code with written values."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rlbooth.align.flow import flow_grpo_kl, flow_mean_std
from rlbooth.align.policy import FlowSDEPolicy, policy_for
from rlbooth.align.ppo import group_advantages
from rlbooth.align.rollout import guided_noise
from rlbooth.align.steps import trained_steps, window_steps
from rlbooth.config import AlignConfig, ConfigError
from rlbooth.families.base import Family
from tests.align.conftest import align_config
from tests.align.test_flow import SD3_SIGMAS
from tests.align.test_train import make_trainer


@pytest.mark.parametrize("index", [1, 4, 9])
def test_flow_grpo_kl_divides_by_the_noise_level_without_dt(index):
    """Flow-GRPO: ((mean - mean_ref)^2).mean(dims) / (2 std_dev_t^2), std_dev_t = a sqrt(s / (1 - s))."""
    gen = torch.Generator().manual_seed(index)
    x, v, v_ref = (torch.randn(2, 4, 3, 3, generator=gen) for _ in range(3))
    sigma, sigma_next = SD3_SIGMAS[index], SD3_SIGMAS[index + 1]
    args = dict(noise_level=0.7, sigma_max=SD3_SIGMAS[1])
    mean, std = flow_mean_std(v, x, torch.tensor(sigma), torch.tensor(sigma_next), **args)
    ref_mean, _ = flow_mean_std(v_ref, x, torch.tensor(sigma), torch.tensor(sigma_next), **args)
    std_dev_t = 0.7 * (sigma / (1 - sigma)) ** 0.5
    expected = ((mean - ref_mean) ** 2).mean(dim=(1, 2, 3)) / (2 * std_dev_t**2)
    torch.testing.assert_close(flow_grpo_kl(mean, ref_mean, std, torch.tensor(sigma_next - sigma)), expected,
                               rtol=1e-5, atol=0)


def test_flow_grpo_kl_is_the_exact_kl_times_minus_dt_so_20_to_110_times_smaller_on_sd3():
    x, v, v_ref = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    ratios = []
    for index in (1, 9):
        s, s_next = torch.tensor(SD3_SIGMAS[index]), torch.tensor(SD3_SIGMAS[index + 1])
        mean, std = flow_mean_std(v, x, s, s_next, noise_level=0.7)
        ref_mean, _ = flow_mean_std(v_ref, x, s, s_next, noise_level=0.7)
        exact = ((mean - ref_mean) ** 2 / (2 * std**2)).mean()
        ratios.append((exact / flow_grpo_kl(mean, ref_mean, std, s_next - s).mean()).item())
    assert ratios == pytest.approx([1 / (0.960129 - 0.913349), 1 / 0.008929], rel=1e-4)  # 21.4x and 112x


def test_flow_grpo_kl_form_is_refused_for_ddim_families():
    with pytest.raises(ConfigError, match="align.kl_form"):
        policy_for(SimpleNamespace(flow_matching=False), None, AlignConfig(kl_form="flow_grpo"), (4, 4))


class _ScaledFamily:
    """A CFG family whose denoiser is w * x * c, c the row's conditioning scalar."""

    classifier_free_guidance = True
    guide = Family.guide  # the plain combination u + g (c - u)

    @staticmethod
    def denoise(unet, latents, timesteps, cond):
        return unet(latents) * cond


@pytest.mark.parametrize("detach, grad", [(False, 11.0), (True, 15.0)])
def test_detach_uncond_drops_the_unconditional_branchs_gradient(detach, grad):
    """x = 2, c_uncond = 0.5, c_cond = 1.5, g = 5: d/dw of u + g (c - u) is (1 - g) x c_u + g x c_c = -4 + 15 = 11
    through both branches; g x c_c = 15 with the unconditional prediction detached (Flow-GRPO's
    noise_pred_uncond.detach()). The value is the same: w x (c_u + g (c_c - c_u)) = 11 at w = 1."""
    unet = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.ones_(unet.weight)
    cond = torch.tensor([[0.5], [1.5]])
    out = guided_noise(_ScaledFamily(), unet, torch.tensor([[2.0]]), torch.tensor(0.0), cond, 5.0, detach)
    out.sum().backward()
    assert out.item() == pytest.approx(11.0)
    assert unet.weight.grad.item() == pytest.approx(grad)


def test_first_selection_trains_flow_grpos_steps_and_never_the_last():
    """Flow-GRPO: range(int(num_steps * timestep_fraction)) = steps 0-8 of 10, for every sample, in order."""
    cfg = AlignConfig(num_steps=10, timestep_fraction=0.99, train_step_selection="first")
    steps = trained_steps(cfg, 0, torch.arange(5), lambda i: i)
    assert steps.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 8]] * 5
    random = trained_steps(AlignConfig(num_steps=10, timestep_fraction=0.99), 0, torch.arange(200), lambda i: i)
    assert 0.8 < (random == 9).any(dim=1).float().mean() < 0.98  # a random 9 of 10 holds the last step 90% of the time


def test_random_selection_is_the_seeded_per_sample_subset():
    cfg = AlignConfig(num_steps=10, timestep_fraction=0.5)
    steps = trained_steps(cfg, 0, torch.tensor([7, 3]), lambda i: 100 + i)
    for row, i in zip(steps, (7, 3)):
        assert row.tolist() == torch.randperm(10, generator=torch.Generator().manual_seed(100 + i))[:5].tolist()


def test_group_std_of_all_rewards_is_flow_grpos_global_std():
    """Flow-GRPO's tracker (global_std): (r - mean of its prompt's rewards) / (std of all rewards + 1e-4).
    Rewards 1..6 in groups {1, 2, 3}, {4, 5, 6}: group means 2 and 5, std of all sqrt(35 / 12)."""
    rewards, groups = np.array([1.0, 2, 3, 4, 5, 6]), np.array([0, 0, 0, 1, 1, 1])
    expected = np.array([-1, 0, 1, -1, 0, 1]) / (1.7078251276599330 + 1e-4)
    np.testing.assert_allclose(group_advantages(rewards, groups, "rewards"), expected, rtol=1e-12)
    # the default divides by the residuals' std, sqrt(2 / 3)
    np.testing.assert_allclose(group_advantages(rewards, groups), np.array([-1, 0, 1, -1, 0, 1]) / (0.816496580927726
                                                                                                   + 1e-6))


def mixgrpo_progressive(start: int, group_size: int, iters_per_group: int, max_timesteps: int, stride: int | None,
                        iterations: int) -> list[list[int]]:
    """MixGRPO's GRPOTrainingStates, progressive with roll_back, transcribed: each iteration's timesteps."""
    cur, in_group, windows = start, 0, []
    for _ in range(iterations):
        windows.append(list(range(cur, min(cur + group_size, max_timesteps))))
        in_group += 1
        if in_group >= iters_per_group:
            in_group = 0
            cur += stride or group_size
        if cur > max_timesteps:
            cur, in_group = start, 0
    return windows


@pytest.mark.parametrize("window, every, stride, epochs", [([0.0, 0.2], 3, None, 15), ([0.2, 0.5], 2, 1, 12)])
def test_sliding_window_is_mixgrpos_progressive_schedule(window, every, stride, epochs):
    """Over the windows that hold all their steps; after them MixGRPO trains a shorter (or empty) window before
    rolling back, rlbooth starts again at once, so every epoch trains as many steps."""
    cfg = AlignConfig(num_steps=10, timestep_window=window, window_shift_every=every, window_stride=stride)
    width = len(cfg.train_steps)
    expected = mixgrpo_progressive(cfg.train_steps[0], width, every, 10, stride, epochs)
    assert [window_steps(cfg, epoch) for epoch in range(epochs)] == expected
    assert window_steps(cfg, epochs) == cfg.train_steps  # rolled back
    assert AlignConfig(num_steps=10, timestep_window=window).train_steps == window_steps(
        AlignConfig(num_steps=10, timestep_window=window), 7)  # 0: static
    steps = trained_steps(cfg, every, torch.arange(3), lambda i: i)
    assert set(steps.flatten().tolist()) == set(expected[every])


def test_the_ode_policy_takes_each_epochs_window():
    family = SimpleNamespace(flow_scheduler=lambda pipe: None)
    policy = FlowSDEPolicy(family, None, (4, 4), noise_level=0.7, sde_steps=[0, 1])
    policy.use_window([4, 5])
    assert policy.sde_steps == {4, 5}
    everywhere = FlowSDEPolicy(family, None, (4, 4), noise_level=0.7)
    everywhere.use_window([4, 5])
    assert everywhere.sde_steps is None  # SDE at every step, as without align.ode_outside_window


def test_each_epoch_samples_with_its_slid_window(stage_one_sd3, tmp_path, monkeypatch):
    config = align_config("align.ode_outside_window=true", "align.timestep_window=[0.0,0.25]",
                          "align.window_shift_every=1")  # of 4 steps: step 0, then 1, 2, 3, 0, ...
    trainer = make_trainer(config, stage_one_sd3, tmp_path)
    seen = []

    def record(epoch):
        seen.append(set(trainer.policy.sde_steps))
        raise StopIteration

    monkeypatch.setattr(trainer, "sample_epoch", record)
    for epoch in range(5):
        with pytest.raises(StopIteration):
            trainer.run_epoch(epoch)
    assert seen == [{0}, {1}, {2}, {3}, {0}]
