import math

import pytest
import torch
from diffusers import DDIMScheduler

from rlbooth.align.ddim import ddim_step_with_logprob

STEPS = 10
SHAPE = (3, 4, 8, 8)
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def make_scheduler(**overrides) -> DDIMScheduler:
    config = dict(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        set_alpha_to_one=False,
        steps_offset=1,
        clip_sample=False,
    )
    config.update(overrides)
    scheduler = DDIMScheduler(**config)
    scheduler.set_timesteps(STEPS)
    return scheduler


def reference_sigma(scheduler: DDIMScheduler, t: int, eta: float = 1.0) -> float:
    """sigma_t written out from alphas_cumprod, independent of the code under test."""
    a = scheduler.alphas_cumprod.double()
    prev_t = t - scheduler.config.num_train_timesteps // STEPS
    a_t = a[t].item()
    a_prev = a[prev_t].item() if prev_t >= 0 else float(scheduler.final_alpha_cumprod)
    return eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))


def inputs(seed: int = 0, shape=SHAPE, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), scale * torch.randn(shape, generator=g)


def timesteps(scheduler: DDIMScheduler) -> list[int]:
    """First, a middle and the last step (whose prev_t < 0)."""
    ts = scheduler.timesteps.tolist()
    return [ts[0], ts[len(ts) // 2], ts[-1]]


def test_sigma_matches_diffusers_variance():
    scheduler = make_scheduler()
    for t in scheduler.timesteps.tolist():
        prev_t = t - 1000 // STEPS
        assert reference_sigma(scheduler, t) == pytest.approx(
            scheduler._get_variance(t, prev_t).item() ** 0.5, rel=1e-5
        )
    assert scheduler.timesteps[-1] - 1000 // STEPS < 0


SCHEDULER_CONFIGS = {
    "epsilon": {},
    "v_prediction": {"prediction_type": "v_prediction"},
    "sample": {"prediction_type": "sample"},
    "clip_sample": {"clip_sample": True, "clip_sample_range": 0.5},
    "thresholding": {"thresholding": True, "sample_max_value": 1.5},
}


@pytest.mark.parametrize("config", SCHEDULER_CONFIGS.values(), ids=SCHEDULER_CONFIGS.keys())
def test_tiny_eta_matches_deterministic_ddim(config):
    scheduler = make_scheduler(**config)
    sample, model_output = inputs(scale=3.0)
    for t in timesteps(scheduler):
        expected = scheduler.step(model_output, t, sample, eta=0.0).prev_sample
        got, log_prob = ddim_step_with_logprob(
            scheduler, model_output, t, sample, eta=1e-6, generator=torch.Generator().manual_seed(1)
        )
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
        assert log_prob.shape == (SHAPE[0],) and torch.isfinite(log_prob).all()


@pytest.mark.parametrize("config", SCHEDULER_CONFIGS.values(), ids=SCHEDULER_CONFIGS.keys())
def test_stochastic_step_matches_diffusers_with_same_noise(config):
    """With diffusers' own sample, the log-prob pins down both the mean and sigma_t."""
    scheduler = make_scheduler(**config)
    sample, model_output = inputs(scale=3.0)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    for t in timesteps(scheduler):
        sigma = reference_sigma(scheduler, t)
        mean = scheduler.step(model_output, t, sample, eta=1.0, variance_noise=torch.zeros(SHAPE)).prev_sample
        drawn = scheduler.step(model_output, t, sample, eta=1.0, variance_noise=z).prev_sample
        torch.testing.assert_close(drawn, mean + sigma * z, atol=1e-5, rtol=1e-5)

        _, lp_mean = ddim_step_with_logprob(scheduler, model_output, t, sample, eta=1.0, prev_sample=mean)
        torch.testing.assert_close(lp_mean, torch.full((SHAPE[0],), -math.log(sigma) - LOG_SQRT_2PI), atol=1e-4, rtol=0)

        returned, lp = ddim_step_with_logprob(scheduler, model_output, t, sample, eta=1.0, prev_sample=drawn)
        assert returned is drawn
        expected = -0.5 * (z**2).mean(dim=(1, 2, 3)) - math.log(sigma) - LOG_SQRT_2PI
        torch.testing.assert_close(lp, expected, atol=1e-3, rtol=0)
        assert (lp < lp_mean).all()


def test_prev_t_zero_uses_alphas_cumprod_zero():
    """With steps_offset 0 a step lands on prev_t == 0, which is not the final alpha."""
    scheduler = make_scheduler(steps_offset=0, set_alpha_to_one=True)
    sample, model_output = inputs()
    t = 1000 // STEPS
    assert t in scheduler.timesteps.tolist()
    mean = scheduler.step(model_output, t, sample, eta=1.0, variance_noise=torch.zeros(SHAPE)).prev_sample
    sigma = reference_sigma(scheduler, t)
    _, lp = ddim_step_with_logprob(scheduler, model_output, t, sample, eta=1.0, prev_sample=mean)
    torch.testing.assert_close(lp, torch.full((SHAPE[0],), -math.log(sigma) - LOG_SQRT_2PI), atol=1e-4, rtol=0)


@pytest.mark.parametrize("per_sample", [False, True], ids=["one-generator", "generator-list"])
def test_seeded_draw_equals_diffusers(per_sample):
    scheduler = make_scheduler()
    sample, model_output = inputs()

    def gen():
        if per_sample:
            return [torch.Generator().manual_seed(10 + i) for i in range(SHAPE[0])]
        return torch.Generator().manual_seed(10)

    for t in timesteps(scheduler):
        expected = scheduler.step(model_output, t, sample, eta=1.0, generator=gen()).prev_sample
        got, _ = ddim_step_with_logprob(scheduler, model_output, t, sample, eta=1.0, generator=gen())
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_timestep_forms_agree():
    scheduler = make_scheduler()
    sample, model_output = inputs()
    t = int(scheduler.timesteps[3])
    results = [
        ddim_step_with_logprob(scheduler, model_output, ts, sample, eta=1.0, generator=torch.Generator().manual_seed(0))
        for ts in (t, torch.tensor(t), torch.full((SHAPE[0],), t))
    ]
    for prev, lp in results[1:]:
        torch.testing.assert_close(prev, results[0][0], atol=0, rtol=0)
        torch.testing.assert_close(lp, results[0][1], atol=0, rtol=0)


def test_per_sample_timesteps_equal_rows_alone():
    scheduler = make_scheduler()
    sample, model_output = inputs()
    ts = scheduler.timesteps[[0, 5, -1]]  # includes the last step, where prev_t < 0
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    prev, lp = ddim_step_with_logprob(scheduler, model_output, ts, sample, eta=1.0, generator=gens)
    # Score the batch's own draws too, as training does with stored trajectories.
    _, lp_rescored = ddim_step_with_logprob(scheduler, model_output, ts, sample, eta=1.0, prev_sample=prev)
    torch.testing.assert_close(lp_rescored, lp, atol=0, rtol=0)
    for i in range(3):
        row_prev, row_lp = ddim_step_with_logprob(
            scheduler,
            model_output[i : i + 1],
            int(ts[i]),
            sample[i : i + 1],
            eta=1.0,
            generator=torch.Generator().manual_seed(i),
        )
        torch.testing.assert_close(prev[i : i + 1], row_prev, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(lp[i : i + 1], row_lp, atol=1e-5, rtol=1e-6)
        alone = scheduler.step(model_output[i : i + 1], int(ts[i]), sample[i : i + 1], eta=0.0).prev_sample
        sigma = reference_sigma(scheduler, int(ts[i]))
        assert not torch.allclose(prev[i : i + 1], alone, atol=sigma / 10)  # it really is stochastic


def test_distribution_of_draws():
    scheduler = make_scheduler()
    shape = (4096, 4, 4, 4)
    sample, model_output = inputs(shape=shape)
    t = int(scheduler.timesteps[4])
    sigma = reference_sigma(scheduler, t)
    prev, lp = ddim_step_with_logprob(
        scheduler, model_output, t, sample, eta=1.0, generator=torch.Generator().manual_seed(3)
    )
    mean = scheduler.step(model_output, t, sample, eta=1.0, variance_noise=torch.zeros(shape)).prev_sample
    residual = prev - mean
    assert residual.mean().abs().item() < 5 * sigma / math.sqrt(residual.numel())
    assert residual.std().item() == pytest.approx(sigma, rel=0.01)
    expected = -0.5 * math.log(2 * math.pi) - math.log(sigma) - 0.5
    assert lp.mean().item() == pytest.approx(expected, abs=0.01)


def test_log_prob_is_averaged_not_summed():
    scheduler = make_scheduler()
    t = int(scheduler.timesteps[2])
    sigma = reference_sigma(scheduler, t)
    values = []
    for shape in [(2, 4, 4, 4), (2, 4, 16, 16)]:
        sample, model_output = inputs(shape=shape)
        mean = scheduler.step(model_output, t, sample, eta=1.0, variance_noise=torch.zeros(shape)).prev_sample
        signs = torch.randint(0, 2, shape, generator=torch.Generator().manual_seed(4)) * 2.0 - 1.0
        _, lp = ddim_step_with_logprob(scheduler, model_output, t, sample, eta=1.0, prev_sample=mean + sigma * signs)
        values.append(lp)
    expected = torch.full((2,), -0.5 - math.log(sigma) - LOG_SQRT_2PI)
    for lp in values:  # every |z| = 1, so both sizes score the same
        torch.testing.assert_close(lp, expected, atol=1e-4, rtol=0)


def test_gradient_flows_through_mean_only():
    """A drawn sample is scored as data: same gradient as scoring a stored copy."""
    scheduler = make_scheduler()
    sample, model_output = inputs()
    t = int(scheduler.timesteps[1])
    drawn_out = model_output.clone().requires_grad_(True)
    prev, lp = ddim_step_with_logprob(scheduler, drawn_out, t, sample, eta=1.0)
    lp.sum().backward()
    stored_out = model_output.clone().requires_grad_(True)
    _, lp_stored = ddim_step_with_logprob(scheduler, stored_out, t, sample, eta=1.0, prev_sample=prev.detach())
    lp_stored.sum().backward()
    assert drawn_out.grad.abs().sum() > 0
    torch.testing.assert_close(drawn_out.grad, stored_out.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtypes(dtype):
    scheduler = make_scheduler()
    sample, model_output = inputs()
    t = int(scheduler.timesteps[2])
    prev, lp = ddim_step_with_logprob(scheduler, model_output.to(dtype), t, sample.to(dtype), eta=1.0)
    assert prev.dtype == dtype and lp.dtype == torch.float32
    # Rescoring the stored (low-precision) sample reproduces the recorded log-prob.
    _, again = ddim_step_with_logprob(scheduler, model_output.to(dtype), t, sample.to(dtype), eta=1.0, prev_sample=prev)
    torch.testing.assert_close(again, lp, atol=0, rtol=0)


@pytest.mark.parametrize("eta", [0.0, -1.0])
def test_eta_must_be_positive(eta):
    scheduler = make_scheduler()
    sample, model_output = inputs()
    with pytest.raises(ValueError, match="eta"):
        ddim_step_with_logprob(scheduler, model_output, int(scheduler.timesteps[0]), sample, eta=eta)


def test_rejects_bad_arguments():
    sample, model_output = inputs()
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim_step_with_logprob(DDIMScheduler(), model_output, 1, sample, eta=1.0)
    scheduler = make_scheduler()
    t = int(scheduler.timesteps[0])
    with pytest.raises(ValueError, match="timestep"):
        ddim_step_with_logprob(scheduler, model_output, torch.full((2,), t), sample, eta=1.0)
    with pytest.raises(ValueError, match="shape"):
        ddim_step_with_logprob(scheduler, model_output[:2], t, sample, eta=1.0)
    with pytest.raises(ValueError, match="sigma_t is 0"):
        last = make_scheduler(set_alpha_to_one=True)
        ddim_step_with_logprob(last, model_output, int(last.timesteps[-1]), sample, eta=1.0)
