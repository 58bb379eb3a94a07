"""What the flow-matching families (SD3, FLUX) share: a transformer denoiser that predicts the velocity
eps - x0, `FlowMatchEulerDiscreteScheduler` instead of a DDIM schedule, a T5 encoder padded to the
pipeline's `max_sequence_length`, and the sampling timesteps each pipeline sets (resolution-dependent
shift where the scheduler asks for it)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from rlbooth.families.base import Family

if TYPE_CHECKING:
    from diffusers import FlowMatchEulerDiscreteScheduler


class FlowMatchingFamily(Family):
    """A family whose denoiser is `pipe.transformer` and whose output is a velocity, not a noise."""

    denoiser = "transformer"
    flow_matching = True
    max_sequence_length: int
    """T5 tokens per prompt, the pipeline's `max_sequence_length` default."""
    t5_tokenizer: str
    """Pipeline attribute of the T5 tokenizer."""
    t5_encoder: str
    """Pipeline attribute of the T5 encoder."""
    script_timestep_density: str
    """Stage one's timestep density by default (personalize.timestep_density null): the default of the family's
    diffusers DreamBooth-LoRA script."""

    def ddim_scheduler(self, pipe: Any) -> Any:
        raise NotImplementedError(
            f"{self.name} is a flow-matching family: it has no DDIM schedule; sample with "
            f"family.flow_scheduler(pipe) and rlbooth.align.flow's SDE step")

    def flow_scheduler(self, pipe: Any) -> "FlowMatchEulerDiscreteScheduler":
        """A fresh copy of the pipeline's flow scheduler, so setting its timesteps leaves the pipeline's alone."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)

    def image_seq_len(self, pipe: Any, height: int, width: int) -> int:
        """Image tokens the transformer sees for latents of `height` x `width`: the resolution shift's input."""
        patch = pipe.transformer.config.patch_size
        return (height // patch) * (width // patch)

    def sampling_sigmas(self, num_steps: int) -> list[float] | None:
        """The sigmas the pipeline passes to `set_timesteps` (None: the scheduler's own spacing)."""
        return None

    def set_timesteps(self, pipe: Any, scheduler: "FlowMatchEulerDiscreteScheduler", num_steps: int,
                      latent_size: tuple[int, int], device: Any = None) -> torch.Tensor:
        """Set `scheduler` to the timesteps the pipeline samples `num_steps` with at this latent size."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = scheduler.config
        kwargs: dict[str, Any] = {}
        if config.get("use_dynamic_shifting", False):
            kwargs["mu"] = calculate_shift(self.image_seq_len(pipe, *latent_size), config.base_image_seq_len,
                                           config.max_image_seq_len, config.base_shift, config.max_shift)
        sigmas = self.sampling_sigmas(num_steps)
        if sigmas is None:
            scheduler.set_timesteps(num_steps, device=device, **kwargs)
        else:
            scheduler.set_timesteps(sigmas=sigmas, device=device, **kwargs)
        return scheduler.timesteps

    def t5_length(self, pipe: Any) -> int:
        """T5 positions per prompt: the pipeline's default, or fewer where the T5 tokenizer's
        `model_max_length` says the model was trained with fewer (the toy world's flow model: 0)."""
        tokenizer = getattr(pipe, self.t5_tokenizer, None)
        return self.max_sequence_length if tokenizer is None else min(self.max_sequence_length,
                                                                      tokenizer.model_max_length)

    def call_kwargs(self, pipe: Any) -> dict[str, Any]:
        return {"max_sequence_length": self.t5_length(pipe)}

    def t5_ids(self, pipe: Any, prompts: list[str]) -> torch.Tensor:
        """T5 ids padded to `t5_length` as the pipeline pads them; zeros without a T5 encoder (the pipeline
        then feeds zero embeddings of that length)."""
        length = self.t5_length(pipe)
        if getattr(pipe, self.t5_encoder, None) is None:
            return torch.zeros(len(prompts), length, dtype=torch.long)
        return getattr(pipe, self.t5_tokenizer)(prompts, padding="max_length", max_length=length, truncation=True,
                                                add_special_tokens=True, return_tensors="pt").input_ids


def linear_sigmas(num_steps: int) -> list[float]:
    """1 down to 1/n in n steps: the sigmas FLUX's pipeline samples with before its shift."""
    return np.linspace(1.0, 1 / num_steps, num_steps).tolist()
