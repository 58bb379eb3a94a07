"""What a model family decides, in one interface: the rest of rlbooth never names a pipeline class.

A family knows its diffusers pipeline class, how prompts become the denoiser's conditioning (one or
two text encoders, pooled embeddings, SDXL's size conditioning), how the denoiser is called, the
DDIM scheduler stage two samples with, which components carry LoRA and how they are saved, and the
tiny model built in code for tests.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from diffusers import DDIMScheduler, DiffusionPipeline

    from rlbooth.config import TinyModelConfig


@dataclass
class Conditioning:
    """Per-row inputs of the denoiser besides the latents and the timestep.

    `hidden` is the cross-attention sequence (B, L, D); `added` holds the family's extra per-row
    tensors (SDXL: `text_embeds` (B, P) and `time_ids` (B, 6)), empty for SD 1.x.
    """

    hidden: torch.Tensor
    added: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def __getitem__(self, rows: Any) -> "Conditioning":
        return Conditioning(self.hidden[rows], {k: v[rows] for k, v in self.added.items()})

    def map(self, fn: Any) -> "Conditioning":
        """The same conditioning with `fn` applied to every tensor."""
        return Conditioning(fn(self.hidden), {k: fn(v) for k, v in self.added.items()})

    def to(self, *args: Any, **kwargs: Any) -> "Conditioning":
        return self.map(lambda t: t.to(*args, **kwargs))

    def repeat_interleave(self, repeats: int) -> "Conditioning":
        return self.map(lambda t: t.repeat_interleave(repeats, dim=0))

    @staticmethod
    def cat(parts: "list[Conditioning]") -> "Conditioning":
        return Conditioning(torch.cat([p.hidden for p in parts]),
                            {k: torch.cat([p.added[k] for p in parts]) for k in parts[0].added})

    @staticmethod
    def guided(uncond: "Conditioning", cond: "Conditioning") -> "Conditioning":
        """Unconditional rows (one row broadcast to the batch) first, then conditional: one CFG forward."""
        n = len(cond)
        return Conditioning.cat([uncond.map(lambda t: t.expand(n, *t.shape[1:])), cond])


class Family(ABC):
    """One model family; subclasses are stateless, so one instance serves every pipeline of the family."""

    name: str
    """Value of `model.family` that selects it."""
    pipeline_class_name: str
    """The diffusers pipeline class (also its `model_index.json` `_class_name`)."""
    text_encoders: tuple[str, ...] = ("text_encoder",)
    """Pipeline attributes of the text encoders, in the order their features are concatenated."""
    tokenizers: tuple[str, ...] = ("tokenizer",)
    """Pipeline attributes of the tokenizers, one per text encoder."""
    large_text_encoders: tuple[str, ...] = ()
    """The multi-billion-parameter text encoders, never trained, that `model.quantize_text_encoders` quantizes."""
    load_kwargs: dict[str, Any] = {}
    """Extra `from_pretrained` arguments (no safety checker, no watermark)."""
    denoiser: str = "unet"
    """Pipeline attribute of the denoiser (`unet`, or `transformer` for the flow-matching families)."""
    classifier_free_guidance: bool = True
    """Whether sampling runs the unconditional batch; a guidance-distilled model (FLUX.1-dev) takes the scale
    as an input instead (`with_guidance`)."""
    flow_matching: bool = False
    """Whether the denoiser predicts a flow velocity on FlowMatchEulerDiscreteScheduler's sigmas (SD3, FLUX)
    rather than a DDPM noise."""

    @property
    def pipeline_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def load(self, source: str, **kwargs: Any) -> "DiffusionPipeline":
        return self.pipeline_class.from_pretrained(source, **self.load_kwargs, **kwargs)

    @abstractmethod
    def build_tiny(self, cfg: "TinyModelConfig") -> "DiffusionPipeline":
        """A randomly initialized pipeline of the family, seconds per step on a CPU."""

    # ------------------------------------------------------------------ prompts

    def tokenize(self, pipe: Any, prompts: list[str]) -> list[torch.Tensor]:
        """Token ids per tokenizer, padded to each tokenizer's length."""
        return [tokenize(getattr(pipe, name), prompts) for name in self.tokenizers]

    @abstractmethod
    def encode(self, text_encoders: list[torch.nn.Module], ids: list[torch.Tensor]) -> Conditioning:
        """Token ids (from `tokenize`) through the given encoders: the prompt part of the conditioning."""

    def encode_prompts(self, pipe: Any, prompts: list[str]) -> Conditioning:
        return self.encode(self.text_encoder_modules(pipe), self.tokenize(pipe, prompts))

    def unconditional(self, pipe: Any) -> Conditioning:
        """The one-row unconditional input of classifier-free guidance, as the family's pipeline makes it."""
        return self.encode_prompts(pipe, [""])

    def with_geometry(self, cond: Conditioning, geometry: torch.Tensor) -> Conditioning:
        """Add the image-size conditioning; `geometry` is (B, 6): original h, w, crop top, left, target h, w."""
        return cond

    def with_guidance(self, cond: Conditioning, scale: float) -> Conditioning:
        """Add the distilled-guidance input (FLUX.1-dev); families that guide by CFG ignore it."""
        return cond

    def text_encoder_modules(self, pipe: Any) -> list[torch.nn.Module]:
        return [getattr(pipe, name) for name in self.text_encoders]

    def call_kwargs(self, pipe: Any) -> dict[str, Any]:
        """Arguments the pipeline's `__call__` needs to condition as `encode_prompts` does."""
        return {}

    def guidance_kwargs(self, guidance_scale: float) -> dict[str, Any]:
        """Arguments the pipeline's `__call__` takes to guide at `guidance_scale` as `guide` does."""
        return {"guidance_scale": guidance_scale}

    def embeds_kwargs(self, cond: Conditioning, uncond: Conditioning) -> dict[str, Any]:
        """The pipeline's prompt arguments from conditioning encoded earlier (`uncond`: `unconditional()`'s row),
        so that drawing runs no text encoder: they can wait in host memory (T5-XXL is 8.9 GiB)."""
        return {"prompt_embeds": cond.hidden, "negative_prompt_embeds": _rows(uncond, len(cond)).hidden}

    @property
    def lora_text_encoders(self) -> tuple[str, ...]:
        """The text encoders that `personalize.train_text_encoder` trains and the LoRA files carry."""
        return self.text_encoders

    # ------------------------------------------------------------------ denoiser

    def denoise(self, unet: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor,
                cond: Conditioning) -> torch.Tensor:
        return unet(latents, timesteps, cond.hidden, added_cond_kwargs=cond.added or None).sample

    def guide(self, uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
        """Classifier-free guidance from the unconditional and conditional predictions."""
        return uncond + scale * (cond - uncond)

    def ddim_scheduler(self, pipe: Any) -> "DDIMScheduler":
        """Stage two's sampler on the model's noise schedule; the last step keeps a non-zero noise
        (`set_alpha_to_one=False`), else its log-probability is undefined."""
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=False)

    # ------------------------------------------------------------------ LoRA

    @property
    def lora_components(self) -> list[str]:
        return [self.denoiser, *self.lora_text_encoders]

    def save_lora(self, folder: Path, layers: dict[str, dict[str, torch.Tensor] | None],
                  configs: dict[str, dict[str, Any]]) -> None:
        """Write `pytorch_lora_weights.safetensors` as the pipeline's `load_lora_weights` reads it.

        `layers` maps a component (`unet`, `text_encoder`, ...) to its diffusers-named LoRA weights,
        `configs` to its peft `LoraConfig` as a dict (stored as metadata: alpha and rank survive a reload).
        """
        kwargs = {f"{name}_lora_layers": layers.get(name) for name in self.lora_components}
        kwargs |= {f"{name}_lora_adapter_metadata": configs.get(name) for name in self.lora_components}
        self.pipeline_class.save_lora_weights(folder, safe_serialization=True, **kwargs)


def _rows(cond: Conditioning, n: int) -> Conditioning:
    """A one-row conditioning repeated to `n` rows."""
    return cond.map(lambda t: t.expand(n, *t.shape[1:]))


def square_geometry(resolution: int) -> torch.Tensor:
    """The size conditioning of a square image drawn at `resolution`, uncropped (what pipelines pass)."""
    return torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=torch.float32)


def tokenize(tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def has_frames(vae: Any) -> bool:
    """Whether the VAE is a video one (Qwen-Image's, Wan-style): it takes and gives (B, C, frames, H, W)."""
    return "temperal_downsample" in vae.config  # sic: the config key of diffusers' Wan-style VAEs


def latent_channels(vae: Any) -> int:
    return vae.config.z_dim if has_frames(vae) else vae.config.latent_channels


def latent_normalization(vae: Any) -> tuple[float | torch.Tensor, float | torch.Tensor]:
    """(shift, scale) of `to_latents`: SD3's and FLUX's VAEs shift before they scale; Qwen-Image's shift and
    scale each channel by its `latents_mean` and 1 / `latents_std`, as (C, 1, 1) tensors."""
    if has_frames(vae):
        channels = (-1, 1, 1)
        return torch.tensor(vae.config.latents_mean).view(channels), 1.0 / torch.tensor(vae.config.latents_std
                                                                                        ).view(channels)
    return vae.config.get("shift_factor") or 0.0, vae.config.scaling_factor


def to_latents(vae: Any, sample: torch.Tensor) -> torch.Tensor:
    """The denoiser's latents from a VAE encoding."""
    shift, scale = (_like(x, sample) for x in latent_normalization(vae))
    return (sample - shift) * scale


def from_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """What `vae.decode` takes, as the pipelines undo `to_latents` before decoding."""
    shift, scale = (_like(x, latents) for x in latent_normalization(vae))
    return latents / scale + shift


def _like(value: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    return value.to(like.device, like.dtype) if isinstance(value, torch.Tensor) else value


def latent_dist(vae: Any, pixels: torch.Tensor) -> Any:
    """The VAE's posterior of (B, 3, H, W) images, its mean and std (B, C, h, w) whatever the VAE."""
    if not has_frames(vae):
        return vae.encode(pixels).latent_dist
    dist = vae.encode(pixels.unsqueeze(2)).latent_dist
    return SimpleNamespace(mean=dist.mean[:, :, 0], std=dist.std[:, :, 0])


def decode_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """`vae.decode` of (B, C, h, w) latents (after `from_latents`) to (B, 3, H, W) images in [-1, 1]."""
    if not has_frames(vae):
        return vae.decode(latents).sample
    return vae.decode(latents.unsqueeze(2)).sample[:, :, 0]
