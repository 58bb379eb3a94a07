"""The stochastic flow-matching step of Flow-GRPO, with the log-probability of the step taken.

Flow models sample with the deterministic Euler ODE x_{s'} = x_s + (s' - s) v, which has no
log-probability. Flow-GRPO replaces it by the SDE with the same marginals; discretized, each step
is Gaussian, so the importance-clipped PPO objective of DDPO applies unchanged:

    mean = x + [v + sigma_t^2 / (2 s) * (x + (1 - s) v)] * dt,    std = sigma_t * sqrt(-dt)

with s the current sigma (1 = noise), dt = s' - s < 0 and the noise level sigma_t either
Flow-GRPO's a * sqrt(s / (1 - s)) or DanceGRPO's constant a. At a = 0 the mean is the Euler step.
"""

from __future__ import annotations

from typing import Literal

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from rlbooth.align.ddim import gaussian_kl, gaussian_log_prob

NoiseSchedule = Literal["flow_grpo", "constant"]


def noise_std(sigma: Tensor, noise_level: float, schedule: NoiseSchedule, sigma_max: float) -> Tensor:
    """sigma_t of the SDE at the current sigma; at sigma = 1 Flow-GRPO's form divides by zero, so the
    schedule's largest sigma below 1 (`sigma_max`) stands in for it there, as Flow-GRPO does."""
    if schedule == "constant":
        return torch.full_like(sigma, noise_level)
    if schedule != "flow_grpo":
        raise ValueError(f"noise schedule must be 'flow_grpo' or 'constant', got {schedule!r}")
    safe = torch.where(sigma >= 1, torch.as_tensor(sigma_max, dtype=sigma.dtype), sigma)
    return noise_level * (sigma / (1 - safe)).sqrt()


def flow_mean_std(velocity: Tensor, sample: Tensor, sigma: Tensor, sigma_next: Tensor, *, noise_level: float,
                  schedule: NoiseSchedule = "flow_grpo", sigma_max: float = 0.98) -> tuple[Tensor, Tensor]:
    """Mean and std of the Gaussian SDE step from `sigma` to `sigma_next`, float32.

    `sigma` and `sigma_next` are one value for the batch or one per sample (training replays each
    stored trajectory at its own step); std broadcasts over the latent.
    """
    if velocity.shape != sample.shape:
        raise ValueError(f"velocity shape {tuple(velocity.shape)} != sample shape {tuple(sample.shape)}")
    batch = sample.shape[0]
    bshape = (batch,) + (1,) * (sample.ndim - 1)
    s, s_next = (torch.as_tensor(x, dtype=torch.float32).to(sample.device).expand(batch).reshape(bshape)
                 for x in (sigma, sigma_next))
    if not bool((s_next < s).all()) or not bool((s > 0).all()):
        raise ValueError("flow steps must go from a sigma in (0, 1] to a smaller one")
    x, v = sample.to(torch.float32), velocity.to(torch.float32)
    dt = s_next - s
    std_t = noise_std(s, noise_level, schedule, sigma_max)
    mean = x + (v + std_t**2 / (2 * s) * (x + (1 - s) * v)) * dt
    return mean, std_t * (-dt).sqrt()


def flow_step_with_logprob(velocity: Tensor, sample: Tensor, sigma: Tensor, sigma_next: Tensor, *,
                           noise_level: float, schedule: NoiseSchedule = "flow_grpo", sigma_max: float = 0.98,
                           prev_sample: Tensor | None = None,
                           generator: torch.Generator | list[torch.Generator] | None = None
                           ) -> tuple[Tensor, Tensor]:
    """One SDE step and its log-prob, shape (B,), averaged over the latent as for DDIM; pass
    `prev_sample` to score a stored step instead of drawing one."""
    if not noise_level > 0:
        raise ValueError(f"noise_level must be > 0 (got {noise_level}): the ODE step has no log-prob")
    if prev_sample is not None and generator is not None:
        raise ValueError("pass either prev_sample or generator, not both: a given prev_sample is not drawn")
    mean, std = flow_mean_std(velocity, sample, sigma, sigma_next, noise_level=noise_level, schedule=schedule,
                              sigma_max=sigma_max)
    if prev_sample is None:
        noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
        prev_sample = (mean + std * noise).to(sample.dtype)
    return prev_sample, gaussian_log_prob(prev_sample, mean, std)


def flow_grpo_kl(mean: Tensor, ref_mean: Tensor, std: Tensor, dt: Tensor) -> Tensor:
    """Flow-GRPO's KL term, shape (B,): the mean over the latent of (mean - ref_mean)^2 / (2 sigma_t^2).

    Its denominator is the SDE's noise level sigma_t without the step's sqrt(-dt), so this is the exact
    Gaussian KL of the step (std = sigma_t sqrt(-dt)) times -dt: 20-110x smaller per step on SD3 at 10
    steps, which is why Flow-GRPO's beta is larger than an exact-KL coefficient would be.
    """
    dt = torch.as_tensor(dt, dtype=torch.float32).to(std.device)
    dt = dt.expand(mean.shape[0]).reshape((-1,) + (1,) * (mean.ndim - 1))
    return gaussian_kl(mean, ref_mean, std / (-dt).sqrt())
