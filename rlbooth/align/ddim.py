"""A DDIM step that also returns the log-probability of the step taken.

DDPO treats each denoising step as a Gaussian policy; the importance ratio
needs log p(x_{t-1} | x_t) under the current weights, which diffusers'
``DDIMScheduler.step`` does not expose.
"""

from __future__ import annotations

import math

import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def _alphas(scheduler: DDIMScheduler, timestep: Tensor) -> tuple[Tensor, Tensor]:
    """Look up alpha-bar on the device the schedule is on (DDIMPolicy puts it beside the timesteps, so that on
    CUDA no step copies a timestep to the host and waits for the GPU)."""
    alphas_cumprod = scheduler.alphas_cumprod.to(torch.float32)
    t = timestep.to(alphas_cumprod.device)
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alpha_t = alphas_cumprod[t]
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32)
    alpha_prev = torch.where(prev_t >= 0, alphas_cumprod[prev_t.clamp(min=0)], final)
    return alpha_t, alpha_prev


def ddim_mean_std(
    scheduler: DDIMScheduler,
    model_output: Tensor,
    timestep: int | Tensor,
    sample: Tensor,
    *,
    eta: float,
) -> tuple[Tensor, Tensor]:
    """Mean and std of the Gaussian DDIM step x_t -> x_{t-1}, float32; std broadcasts over the latent.

    ``timestep`` may be one step for the batch or one per sample, since
    training replays each stored trajectory at its own step.
    """
    if not eta > 0:
        raise ValueError(
            f"eta must be > 0 (got {eta}): the log-prob is undefined at eta = 0 "
            "(deterministic DDIM); set eta > 0, e.g. 1.0"
        )
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(num_inference_steps) first")
    if sample.ndim < 2:
        raise ValueError(f"sample must be batched, shape (B, ...), got {tuple(sample.shape)}")
    if model_output.shape != sample.shape:
        raise ValueError(f"model_output shape {tuple(model_output.shape)} != sample shape {tuple(sample.shape)}")

    batch = sample.shape[0]
    t = torch.as_tensor(timestep, dtype=torch.long)
    if t.ndim == 0:
        t = t.expand(batch)
    elif t.shape != (batch,):
        raise ValueError(f"timestep must be a scalar or have shape ({batch},), got {tuple(t.shape)}")

    alpha_t, alpha_prev = _alphas(scheduler, t)
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    std_dev = eta * variance.sqrt()
    # Checked here, on the schedule's device, so the GPU is not synchronized.
    if not bool((std_dev > 0).all()):
        raise ValueError(
            "sigma_t is 0 at this step (e.g. set_alpha_to_one=True at the last step): "
            "the step is deterministic and has no log-prob"
        )

    # Per-sample scalars broadcast over the latent's dims.
    bshape = (batch,) + (1,) * (sample.ndim - 1)
    alpha_t, alpha_prev, std_dev = (x.to(sample.device).view(bshape) for x in (alpha_t, alpha_prev, std_dev))

    # float32 throughout: half-precision means and log-densities are too coarse
    # for ratios that are clipped at 1 +- 1e-4.
    x_t = sample.to(torch.float32)
    out = model_output.to(torch.float32)
    beta_t = 1 - alpha_t
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        x0_hat = (x_t - beta_t.sqrt() * out) / alpha_t.sqrt()
        eps_hat = out
    elif prediction_type == "v_prediction":
        x0_hat = alpha_t.sqrt() * x_t - beta_t.sqrt() * out
        eps_hat = alpha_t.sqrt() * out + beta_t.sqrt() * x_t
    elif prediction_type == "sample":
        x0_hat = out
        eps_hat = (x_t - alpha_t.sqrt() * x0_hat) / beta_t.sqrt()
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")

    if scheduler.config.thresholding:
        x0_hat = scheduler._threshold_sample(x0_hat)
    elif scheduler.config.clip_sample:
        limit = scheduler.config.clip_sample_range
        x0_hat = x0_hat.clamp(-limit, limit)

    mean = alpha_prev.sqrt() * x0_hat + (1 - alpha_prev - std_dev**2).sqrt() * eps_hat

    return mean, std_dev


def ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    model_output: Tensor,
    timestep: int | Tensor,
    sample: Tensor,
    *,
    eta: float,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> tuple[Tensor, Tensor]:
    """One DDIM step x_t -> x_{t-1} and log p(x_{t-1} | x_t), shape (B,).

    Pass ``prev_sample`` to score a stored step instead of drawing one. The
    log-prob is averaged over the latent's dimensions, not summed: the sum
    grows with the latent size and overflows the importance ratio.
    """
    if prev_sample is not None and prev_sample.shape != sample.shape:
        raise ValueError(f"prev_sample shape {tuple(prev_sample.shape)} != sample shape {tuple(sample.shape)}")
    if prev_sample is not None and generator is not None:
        raise ValueError("pass either prev_sample or generator, not both: a given prev_sample is not drawn")
    mean, std_dev = ddim_mean_std(scheduler, model_output, timestep, sample, eta=eta)
    if prev_sample is None:
        # Same draw as diffusers' step (shape, generator, dtype), so seeded runs agree.
        noise = randn_tensor(
            model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
        )
        prev_sample = (mean + std_dev * noise.to(torch.float32)).to(sample.dtype)

    return prev_sample, gaussian_log_prob(prev_sample, mean, std_dev)


def gaussian_log_prob(sample: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """log N(sample; mean, std^2) averaged over the latent's dimensions, shape (B,).

    Scored on the sample as stored (after its cast), so the value recomputed later from the
    stored step equals the one recorded now. Detached: the policy gradient flows through the
    mean only.
    """
    diff = sample.detach().to(torch.float32) - mean
    log_prob = -(diff**2) / (2 * std**2) - std.log() - _LOG_SQRT_2PI
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def gaussian_kl(mean: Tensor, ref_mean: Tensor, std: Tensor) -> Tensor:
    """KL between two steps' Gaussians of equal std, averaged over the latent's dimensions, shape (B,)."""
    kl = (mean - ref_mean) ** 2 / (2 * std**2)
    return kl.mean(dim=tuple(range(1, kl.ndim)))
