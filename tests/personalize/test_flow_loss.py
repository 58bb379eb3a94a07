"""Stage one's flow-matching pieces against diffusers: the timestep densities draw what
`compute_density_for_timestep_sampling` draws from the same generator, the weights are
`compute_loss_weighting_for_sd3`'s, the training grid and noisy input are the scheduler's (with SD3's
shift; FLUX's dynamic shift unapplied), and the prior split weights each half by its own rows."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from rlbooth.personalize.flow_loss import (
    FlowTrainingGrid,
    flow_loss,
    loss_weights,
    noisy_latents,
    prediction_and_target,
    sample_density,
    velocity_target,
)
from rlbooth.config import PersonalizeConfig
from rlbooth.families import FAMILIES
from rlbooth.personalize.loss import dreambooth_loss
from rlbooth.personalize.objective import objective_for

SD3_SCHEDULER = FlowMatchEulerDiscreteScheduler(shift=3.0)
FLUX_SCHEDULER = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)


@pytest.mark.parametrize("density, mean, std, scale", [
    ("logit_normal", 0.0, 1.0, None), ("logit_normal", 0.5, 0.7, None), ("mode", None, None, 1.29),
    ("mode", None, None, 0.0), ("uniform", None, None, None)])
def test_densities_draw_diffusers_draws(density, mean, std, scale):
    kwargs = {k: v for k, v in (("logit_mean", mean), ("logit_std", std), ("mode_scale", scale)) if v is not None}
    ours = sample_density(density, 4096, generator=torch.Generator().manual_seed(3), **kwargs)
    theirs = compute_density_for_timestep_sampling(
        "none" if density == "uniform" else density, 4096, logit_mean=mean, logit_std=std, mode_scale=scale,
        generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert ours.min() >= 0 and ours.max() <= 1


def test_densities_differ_where_they_should():
    """Logit-normal concentrates on the middle; mode 0 is uniform (1 - u); a positive mode scale moves mass
    inwards."""
    draw = lambda density, **kw: sample_density(density, 20000, generator=torch.Generator().manual_seed(0), **kw)
    middle = lambda u: ((u > 0.25) & (u < 0.75)).float().mean().item()
    assert middle(draw("logit_normal")) > 0.65 > middle(draw("uniform")) > 0.45
    torch.testing.assert_close(draw("mode", mode_scale=0.0), 1 - draw("uniform"))
    assert middle(draw("mode", mode_scale=1.29)) > middle(draw("uniform")) + 0.05
    with pytest.raises(ValueError, match="density"):
        sample_density("cosmap", 2)


@pytest.mark.parametrize("weighting", ["none", "sigma_sqrt", "cosmap"])
def test_weights_are_diffusers_weights(weighting):
    sigmas = torch.linspace(0.05, 1.0, 20)
    theirs = compute_loss_weighting_for_sd3(weighting, sigmas.view(-1, 1, 1, 1)).flatten()
    torch.testing.assert_close(loss_weights(weighting, sigmas), theirs, rtol=0, atol=0)
    with pytest.raises(ValueError, match="weighting"):
        loss_weights("logit_normal", sigmas)


@pytest.mark.parametrize("scheduler", [SD3_SCHEDULER, FLUX_SCHEDULER], ids=["sd3-shift3", "flux-dynamic"])
def test_training_inputs_are_the_scripts(scheduler):
    """u -> index -> timestep on the scheduler's grid -> sigma by the scripts' lookup -> x_s, as the
    DreamBooth scripts do it; the noisy input is also the scheduler's `scale_noise`."""
    grid = FlowTrainingGrid.of(scheduler)
    u = compute_density_for_timestep_sampling("logit_normal", 6, logit_mean=0.0, logit_std=1.0,
                                              generator=torch.Generator().manual_seed(0))
    timesteps, sigmas = grid.at(grid.indices(u))
    expected_t = scheduler.timesteps[(u * scheduler.config.num_train_timesteps).long()]
    torch.testing.assert_close(timesteps, expected_t, rtol=0, atol=0)
    lookup = torch.stack([scheduler.sigmas[(scheduler.timesteps == t).nonzero().item()] for t in timesteps])
    torch.testing.assert_close(sigmas, lookup, rtol=0, atol=0)
    torch.testing.assert_close(timesteps, sigmas * 1000)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(6, 16, 4, 4, generator=g), torch.randn(6, 16, 4, 4, generator=g)
    fresh = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    torch.testing.assert_close(noisy_latents(x0, noise, sigmas), fresh.scale_noise(x0, timesteps, noise))
    torch.testing.assert_close(velocity_target(x0, noise), noise - x0, rtol=0, atol=0)
    unshifted = scheduler.config.use_dynamic_shifting  # FLUX trains on the linear grid
    assert torch.allclose(grid.sigmas, torch.linspace(1.0, 0.001, 1000)) == unshifted


def test_grid_ignores_a_scheduler_set_for_sampling_and_clamps_the_end():
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER.config)
    scheduler.set_timesteps(4)
    grid = FlowTrainingGrid.of(scheduler)
    torch.testing.assert_close(grid.timesteps, SD3_SCHEDULER.timesteps, rtol=0, atol=0)
    assert grid.indices(torch.tensor([0.0, 0.9999, 1.0])).tolist() == [0, 999, 999]


def test_loss_without_prior_is_the_weighted_mse():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 16, 4, 4, generator=g), torch.randn(4, 16, 4, 4, generator=g)
    sigmas = torch.tensor([0.2, 0.4, 0.6, 0.9])
    loss, parts = flow_loss(pred, target, sigmas, with_prior=False, prior_loss_weight=1.0)
    torch.testing.assert_close(loss, F.mse_loss(pred, target))
    assert set(parts) == {"instance_loss"}
    weighted, _ = flow_loss(pred, target, sigmas, weighting="sigma_sqrt", with_prior=False, prior_loss_weight=1.0)
    per_image = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(weighted, (per_image / sigmas**2).mean())


def test_prior_split_matches_dreambooth_loss_and_weights_each_half_by_its_rows():
    """Unweighted, the split is `dreambooth_loss`'s (instance half + weight x prior half); weighted, each half
    takes its own rows' weights, so swapping the halves' sigmas changes the loss."""
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 16, 4, 4, generator=g), torch.randn(4, 16, 4, 4, generator=g)
    sigmas = torch.tensor([0.2, 0.3, 0.7, 0.9])
    ours, parts = flow_loss(pred, target, sigmas, with_prior=True, prior_loss_weight=0.5)
    reference, ref_parts = dreambooth_loss(pred, target, torch.zeros(4, dtype=torch.long), with_prior=True,
                                           prior_loss_weight=0.5)
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(parts["prior_loss"], ref_parts["prior_loss"])

    weights = compute_loss_weighting_for_sd3("cosmap", sigmas)
    per_image = ((pred - target) ** 2).mean(dim=(1, 2, 3)) * weights
    weighted, parts = flow_loss(pred, target, sigmas, weighting="cosmap", with_prior=True, prior_loss_weight=0.5)
    torch.testing.assert_close(parts["instance_loss"], per_image[:2].mean())
    torch.testing.assert_close(parts["prior_loss"], per_image[2:].mean())
    torch.testing.assert_close(weighted, per_image[:2].mean() + 0.5 * per_image[2:].mean())
    swapped, _ = flow_loss(pred, target, sigmas[[2, 3, 0, 1]], weighting="cosmap", with_prior=True,
                           prior_loss_weight=0.5)
    assert not torch.allclose(swapped, weighted)


def test_gradient_of_the_velocity_loss_points_to_the_target():
    """One gradient step on a free prediction lowers the loss towards eps - x0 at every sigma."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 2, 2, generator=g), torch.randn(2, 4, 2, 2, generator=g)
    pred = torch.zeros(2, 4, 2, 2, requires_grad=True)
    loss, _ = flow_loss(pred, velocity_target(x0, noise), torch.tensor([0.3, 0.8]), weighting="sigma_sqrt",
                        with_prior=False, prior_loss_weight=1.0)
    loss.backward()
    assert (pred.grad.sign() == -(noise - x0).sign()).all()


def test_preconditioned_outputs_are_the_sd3_scripts_x0_regression():
    """diffusers' SD3 script: model_pred * (-sigmas) + noisy_model_input against model_input. x0 = (1, 2),
    eps = (0.5, -1), s = 0.4: x_s = (0.8, 0.8); v = (0.1, 0.2) gives x0 prediction (0.76, 0.72), squared error
    (0.0576 + 1.6384) / 2 = 0.848, which is s^2 = 0.16 times the velocity loss ((0.36 + 10.24) / 2 = 5.3)."""
    x0, eps, v, sigmas = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, -1.0]]), torch.tensor([[0.1, 0.2]]), \
        torch.tensor([0.4])
    pred, target = prediction_and_target(v, x0, eps, sigmas, precondition=True)
    torch.testing.assert_close(pred, torch.tensor([[0.76, 0.72]]))
    torch.testing.assert_close(target, x0)
    loss, _ = flow_loss(pred, target, sigmas, with_prior=False, prior_loss_weight=1.0)
    assert loss.item() == pytest.approx(0.848)
    velocity, _ = flow_loss(*prediction_and_target(v, x0, eps, sigmas, precondition=False), sigmas,
                            with_prior=False, prior_loss_weight=1.0)
    assert velocity.item() == pytest.approx(5.3)


@pytest.mark.parametrize("family, density", [("sd3", "logit_normal"), ("flux", "uniform")])
def test_default_timestep_density_is_the_family_scripts(family, density):
    """diffusers' SD3 script defaults to --weighting_scheme logit_normal, its FLUX script to none (u uniform)."""
    pipe = SimpleNamespace(scheduler=SD3_SCHEDULER)
    assert objective_for(FAMILIES[family], pipe, PersonalizeConfig()).density == density
    chosen = PersonalizeConfig(timestep_density="mode")
    assert objective_for(FAMILIES[family], pipe, chosen).density == "mode"
