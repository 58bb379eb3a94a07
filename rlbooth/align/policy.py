"""The sampler stage two treats as its policy: steps x_t -> x_{t-1} that are Gaussian, with their log-probs.

DDPM families sample with DDIM (eta > 0, DDPO); flow-matching families with Flow-GRPO's SDE, optionally
only inside a window of steps and with the deterministic Euler ODE elsewhere (MixGRPO), whose steps have
no log-probability and are never trained. Steps are addressed by their index in the sampling schedule,
so a stored trajectory is replayed at its own steps.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from rlbooth.align.ddim import ddim_mean_std, ddim_step_with_logprob, gaussian_kl
from rlbooth.align.flow import NoiseSchedule, flow_grpo_kl, flow_mean_std, flow_step_with_logprob
from rlbooth.config import ConfigError

if TYPE_CHECKING:
    from rlbooth.config import AlignConfig
    from rlbooth.families import Family

Generators = torch.Generator | list[torch.Generator] | None
KLForm = Literal["gaussian", "flow_grpo"]


class StepPolicy(ABC):
    timesteps: Tensor
    """The denoiser's timestep input at each step, after `set_timesteps`."""
    init_noise_sigma: float = 1.0

    @abstractmethod
    def set_timesteps(self, num_steps: int, device: Any = None) -> Tensor:
        """Set and return the schedule's timesteps."""

    @abstractmethod
    def mean_std(self, model_output: Tensor, step: Tensor, sample: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and std of the Gaussian step(s) `step` (one index, or one per sample), float32."""

    @abstractmethod
    def step(self, model_output: Tensor, step: Tensor, sample: Tensor, *, prev_sample: Tensor | None = None,
             generator: Generators = None) -> tuple[Tensor, Tensor]:
        """Draw (or score the given `prev_sample` of) step(s) `step`; returns x_{t-1} and log p, shape (B,)."""

    def kl(self, mean: Tensor, ref_mean: Tensor, std: Tensor, step: Tensor) -> Tensor:
        """KL penalty of step(s) `step` to the reference's mean, shape (B,): the exact Gaussian KL."""
        return gaussian_kl(mean, ref_mean, std)

    def use_window(self, steps: Sequence[int]) -> None:
        """This epoch's trained steps (align.window_shift_every); only a policy with ODE steps outside them cares."""
    @abstractmethod
    def add_noise(self, x0: Tensor, noise: Tensor, step: Tensor) -> Tensor:
        """The forward process at step(s) `step`: x_t from clean latents and a noise, float32 (DiffusionNFT)."""

    @abstractmethod
    def predict_x0(self, model_output: Tensor, step: Tensor, sample: Tensor) -> Tensor:
        """The clean latents the model output predicts at step(s) `step`, float32; affine in the output, so
        mixing outputs mixes these predictions (DiffusionNFT's implicit policies, on any family)."""


def _per_sample(values: Tensor, sample: Tensor) -> Tensor:
    """One scalar per row (or one for all), shaped to broadcast over the latent."""
    return values.to(sample.device, torch.float32).expand(sample.shape[0]).reshape(-1, *[1] * (sample.ndim - 1))


class DDIMPolicy(StepPolicy):
    """DDIM with eta > 0 on the model's own noise schedule (DDPO)."""

    def __init__(self, scheduler: Any, eta: float) -> None:
        self.scheduler, self.eta = scheduler, eta
        self.init_noise_sigma = float(scheduler.init_noise_sigma)

    def set_timesteps(self, num_steps: int, device: Any = None) -> Tensor:
        self.scheduler.set_timesteps(num_steps, device=device)
        self.scheduler.alphas_cumprod = self.scheduler.alphas_cumprod.to(self.scheduler.timesteps.device)
        self.timesteps = self.scheduler.timesteps
        return self.timesteps

    def _t(self, step: Tensor) -> Tensor:
        return self.timesteps[torch.as_tensor(step).to(self.timesteps.device)]

    def mean_std(self, model_output: Tensor, step: Tensor, sample: Tensor) -> tuple[Tensor, Tensor]:
        return ddim_mean_std(self.scheduler, model_output, self._t(step), sample, eta=self.eta)

    def step(self, model_output: Tensor, step: Tensor, sample: Tensor, *, prev_sample: Tensor | None = None,
             generator: Generators = None) -> tuple[Tensor, Tensor]:
        return ddim_step_with_logprob(self.scheduler, model_output, self._t(step), sample, eta=self.eta,
                                      prev_sample=prev_sample, generator=generator)

    def _alpha(self, step: Tensor, sample: Tensor) -> Tensor:
        return _per_sample(self.scheduler.alphas_cumprod.float()[self._t(step)], sample)

    def add_noise(self, x0: Tensor, noise: Tensor, step: Tensor) -> Tensor:
        alpha = self._alpha(step, x0)
        return alpha.sqrt() * x0.float() + (1 - alpha).sqrt() * noise.float()

    def predict_x0(self, model_output: Tensor, step: Tensor, sample: Tensor) -> Tensor:
        return x0_prediction(self.scheduler.config.prediction_type, model_output.float(), sample.float(),
                             self._alpha(step, sample))


class DDIMODEPolicy(DDIMPolicy):
    """Deterministic DDIM (eta = 0), the ODE solver DiffusionNFT samples DDPM families with: its steps carry
    no log-probability (a zero stands in), which NFT never reads."""

    def __init__(self, scheduler: Any) -> None:
        super().__init__(scheduler, eta=0.0)

    def step(self, model_output: Tensor, step: Tensor, sample: Tensor, *, prev_sample: Tensor | None = None,
             generator: Generators = None) -> tuple[Tensor, Tensor]:
        t = self._t(step)
        prev_t = t - self.scheduler.config.num_train_timesteps // self.scheduler.num_inference_steps
        alphas = self.scheduler.alphas_cumprod.float()
        final = torch.as_tensor(self.scheduler.final_alpha_cumprod, dtype=torch.float32)
        alpha_prev = _per_sample(torch.where(prev_t >= 0, alphas[prev_t.clamp(min=0)], final), sample)
        alpha = self._alpha(step, sample)
        x0 = self.predict_x0(model_output, step, sample)
        eps = (sample.float() - alpha.sqrt() * x0) / (1 - alpha).sqrt()
        x = alpha_prev.sqrt() * x0 + (1 - alpha_prev).sqrt() * eps
        return x.to(sample.dtype), torch.zeros(sample.shape[0], device=sample.device)


class FlowSDEPolicy(StepPolicy):
    """Flow-GRPO's SDE on a flow-matching family's sampling sigmas; the Euler ODE at steps not in `sde_steps`
    (which the trainer passes as `align.train_steps`, the one list of trained steps)."""

    def __init__(self, family: "Family", pipe: Any, latent_size: tuple[int, int], *, noise_level: float,
                 schedule: NoiseSchedule = "flow_grpo", sde_steps: Sequence[int] | None = None,
                 kl_form: KLForm = "gaussian", fixed_steps: bool = False) -> None:
        self.family, self.pipe, self.latent_size = family, pipe, latent_size
        self.scheduler = family.flow_scheduler(pipe)
        self.noise_level, self.schedule, self.kl_form = noise_level, schedule, kl_form
        self.sde_steps = None if sde_steps is None else frozenset(sde_steps)
        self.fixed_steps = fixed_steps  # sde_steps stay as given whatever the trained window

    def set_timesteps(self, num_steps: int, device: Any = None) -> Tensor:
        self.timesteps = self.family.set_timesteps(self.pipe, self.scheduler, num_steps, self.latent_size,
                                                   device=device)
        self.sigmas = self.scheduler.sigmas.float().cpu()
        # Flow-GRPO's sigma_t divides by 1 - sigma, which is 0 at pure noise: the largest sigma below 1 stands in.
        below_one = self.sigmas[self.sigmas < 1]
        self.sigma_max = float(below_one.max()) if len(below_one) else 0.98
        return self.timesteps

    def _sigmas(self, step: Tensor) -> tuple[Tensor, Tensor]:
        index = torch.as_tensor(step).cpu()
        return self.sigmas[index], self.sigmas[index + 1]

    def mean_std(self, model_output: Tensor, step: Tensor, sample: Tensor) -> tuple[Tensor, Tensor]:
        sigma, sigma_next = self._sigmas(step)
        return flow_mean_std(model_output, sample, sigma, sigma_next, noise_level=self.noise_level,
                             schedule=self.schedule, sigma_max=self.sigma_max)

    def use_window(self, steps: Sequence[int]) -> None:
        if self.sde_steps is not None and not self.fixed_steps:
            self.sde_steps = frozenset(steps)

    def kl(self, mean: Tensor, ref_mean: Tensor, std: Tensor, step: Tensor) -> Tensor:
        """The exact Gaussian KL, or Flow-GRPO's term (align.kl_form), which is it times -dt."""
        if self.kl_form == "gaussian":
            return gaussian_kl(mean, ref_mean, std)
        sigma, sigma_next = self._sigmas(step)
        return flow_grpo_kl(mean, ref_mean, std, sigma_next - sigma)

    def step(self, model_output: Tensor, step: Tensor, sample: Tensor, *, prev_sample: Tensor | None = None,
             generator: Generators = None) -> tuple[Tensor, Tensor]:
        index = torch.as_tensor(step)
        if self.sde_steps is not None and not any(int(i) in self.sde_steps for i in index.reshape(-1)):
            sigma, sigma_next = self._sigmas(index)  # the Euler ODE step: no noise, no log-prob
            dt = (sigma_next - sigma).to(sample.device)
            x = sample.float() + (dt if index.ndim == 0 else _per_sample(dt, sample)) * model_output.float()
            return x.to(sample.dtype), torch.zeros(sample.shape[0], device=sample.device)
        sigma, sigma_next = self._sigmas(index)
        return flow_step_with_logprob(model_output, sample, sigma, sigma_next, noise_level=self.noise_level,
                                      schedule=self.schedule, sigma_max=self.sigma_max, prev_sample=prev_sample,
                                      generator=generator)

    def add_noise(self, x0: Tensor, noise: Tensor, step: Tensor) -> Tensor:
        sigma = _per_sample(self._sigmas(step)[0], x0)
        return (1 - sigma) * x0.float() + sigma * noise.float()

    def predict_x0(self, model_output: Tensor, step: Tensor, sample: Tensor) -> Tensor:
        return sample.float() - _per_sample(self._sigmas(step)[0], sample) * model_output.float()


def x0_prediction(prediction_type: str, output: Tensor, x_t: Tensor, alpha: Tensor) -> Tensor:
    """x0 from a DDPM model's epsilon, v or sample prediction at alpha-bar `alpha` (unclipped: clipping would
    break the affinity DiffusionNFT needs)."""
    if prediction_type == "epsilon":
        return (x_t - (1 - alpha).sqrt() * output) / alpha.sqrt()
    if prediction_type == "v_prediction":
        return alpha.sqrt() * x_t - (1 - alpha).sqrt() * output
    if prediction_type == "sample":
        return output
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def ode_policy_for(family: "Family", pipe: Any, latent_size: tuple[int, int]) -> StepPolicy:
    """The family's deterministic sampler: DDIM at eta = 0, or the Euler ODE on the flow sigmas at every step,
    whatever the trained window (`use_window` leaves it as it is)."""
    if family.flow_matching:
        return FlowSDEPolicy(family, pipe, latent_size, noise_level=1.0, sde_steps=(), fixed_steps=True)
    return DDIMODEPolicy(family.ddim_scheduler(pipe))


def policy_for(family: "Family", pipe: Any, cfg: "AlignConfig", latent_size: tuple[int, int]) -> StepPolicy:
    """DDIM for DDPM families (DDPO); Flow-GRPO's SDE for flow-matching ones, with the Euler ODE outside the
    trained window under align.ode_outside_window (MixGRPO)."""
    if family.flow_matching:
        return FlowSDEPolicy(family, pipe, latent_size, noise_level=cfg.flow_noise_level,
                             schedule=cfg.flow_noise_schedule,
                             sde_steps=cfg.train_steps if cfg.ode_outside_window else None, kl_form=cfg.kl_form)
    if cfg.kl_form != "gaussian":
        raise ConfigError(f"align.kl_form: {cfg.kl_form!r} is a flow-matching form (Flow-GRPO's); DDIM families "
                          "(sd, sdxl) take `gaussian`")
    return DDIMPolicy(family.ddim_scheduler(pipe), cfg.eta)
