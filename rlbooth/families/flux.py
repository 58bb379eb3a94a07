"""FLUX.1: CLIP's pooled output as `pooled_projections`, T5's tokens as the sequence; the transformer
sees the latents as 2x2 patches packed into tokens, with (0, row, column) position ids per image token
and zero ids per text token. FLUX.1-dev is guidance-distilled: the guidance scale is an input
(`guidance_embeds`), there is no unconditional batch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from rlbooth.families.base import Conditioning, tokenize
from rlbooth.families.flowmatch import FlowMatchingFamily, linear_sigmas

if TYPE_CHECKING:
    from diffusers import FluxPipeline

    from rlbooth.config import TinyModelConfig


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C * 4): one token per 2x2 patch, row-major, channel-major within."""
    b, c, h, w = latents.shape
    patches = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack` for latents of `height` x `width`."""
    b, _, features = tokens.shape
    patches = tokens.reshape(b, height // 2, width // 2, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, features // 4, height, width)


def image_ids(height: int, width: int, device: Any = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(H/2 * W/2, 3) rotary position ids of the packed tokens: (0, patch row, patch column)."""
    rows, cols = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return ids.to(device=device, dtype=dtype)


class Flux(FlowMatchingFamily):
    name = "flux"
    pipeline_class_name = "FluxPipeline"
    text_encoders = ("text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")
    lora_text_encoders = ("text_encoder",)  # FLUX's LoRA loader carries CLIP's, never T5's
    large_text_encoders = ("text_encoder_2",)  # T5-XXL
    max_sequence_length = 512
    script_timestep_density = "uniform"  # train_dreambooth_lora_flux.py: --weighting_scheme none, u ~ U[0, 1)
    t5_tokenizer, t5_encoder = "tokenizer_2", "text_encoder_2"
    classifier_free_guidance = False

    def tokenize(self, pipe: Any, prompts: list[str]) -> list[torch.Tensor]:
        return [tokenize(pipe.tokenizer, prompts), self.t5_ids(pipe, prompts)]

    def encode(self, text_encoders: list[torch.nn.Module], ids: list[torch.Tensor]) -> Conditioning:
        (clip, t5), (clip_ids, t5_ids) = text_encoders, ids
        pooled = clip(clip_ids.to(clip.device), output_hidden_states=False).pooler_output.to(clip.dtype)
        hidden = t5(t5_ids.to(t5.device), output_hidden_states=False)[0].to(t5.dtype)
        return Conditioning(hidden, {"pooled_projections": pooled.to(hidden.device)})

    def embeds_kwargs(self, cond: Conditioning, uncond: Conditioning) -> dict[str, Any]:
        """FLUX.1-dev guides by its distilled input, so no negative prompt."""
        return {"prompt_embeds": cond.hidden, "pooled_prompt_embeds": cond.added["pooled_projections"]}

    def with_guidance(self, cond: Conditioning, scale: float) -> Conditioning:
        guidance = torch.full((len(cond),), scale, device=cond.hidden.device, dtype=torch.float32)
        return Conditioning(cond.hidden, cond.added | {"guidance": guidance})

    def denoise(self, transformer: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor,
                cond: Conditioning) -> torch.Tensor:
        """The velocity of (B, C, H, W) latents, unpacked; `timesteps` on the scheduler's scale
        (sigma * 1000), which FLUX's transformer takes divided by 1000."""
        guidance = None
        if getattr(transformer, "module", transformer).config.guidance_embeds:  # under DDP, the wrapped model's
            if "guidance" not in cond.added:
                raise ValueError("this FLUX transformer is guidance-distilled: add the scale with family.with_guidance")
            guidance = cond.added["guidance"]
        height, width = latents.shape[-2:]
        out = transformer(hidden_states=pack(latents), timestep=timesteps.to(latents.dtype) / 1000,
                          guidance=guidance, pooled_projections=cond.added["pooled_projections"],
                          encoder_hidden_states=cond.hidden,
                          txt_ids=cond.hidden.new_zeros(cond.hidden.shape[1], 3, dtype=latents.dtype),
                          img_ids=image_ids(height, width, latents.device, latents.dtype), return_dict=False)[0]
        return unpack(out, height, width)

    def image_seq_len(self, pipe: Any, height: int, width: int) -> int:
        return (height // 2) * (width // 2)

    def sampling_sigmas(self, num_steps: int) -> list[float] | None:
        return linear_sigmas(num_steps)

    def build_tiny(self, cfg: "TinyModelConfig", guidance_embeds: bool = True) -> "FluxPipeline":
        """Transformer as wide as the first UNet block (heads of 16), one double-stream block and one
        single-stream block per further UNet block; T5 four times the CLIP width, as FLUX's 4096 against 768;
        guidance-distilled like FLUX.1-dev unless `guidance_embeds=False` (schnell)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

        from rlbooth.families.tiny import tiny_text_encoder, tiny_tokenizer
        from rlbooth.families.tiny_flow import LATENT_CHANNELS, tiny_flow_vae, tiny_t5, tiny_t5_tokenizer

        torch.manual_seed(cfg.seed)
        head_dim, joint = 16, 4 * cfg.text_hidden_size
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=1, num_single_layers=len(cfg.unet_channels) - 1,
            attention_head_dim=head_dim, num_attention_heads=cfg.unet_channels[0] // head_dim,
            joint_attention_dim=joint, pooled_projection_dim=cfg.text_hidden_size, guidance_embeds=guidance_embeds,
            axes_dims_rope=(4, 6, 6))
        vae = tiny_flow_vae(cfg, scaling_factor=0.3611, shift_factor=0.1159)  # FLUX's VAE constants
        tokenizer, tokenizer_2 = tiny_tokenizer(), tiny_t5_tokenizer()
        text_encoder = tiny_text_encoder(cfg, tokenizer)
        text_encoder_2 = tiny_t5(cfg, tokenizer_2, joint)
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
        return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                            text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
