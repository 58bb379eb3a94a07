"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, its last hidden state as the cross-attention input."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from rlbooth.families.base import Conditioning, Family

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

    from rlbooth.config import TinyModelConfig


class StableDiffusion(Family):
    name = "sd"
    pipeline_class_name = "StableDiffusionPipeline"
    load_kwargs = {"safety_checker": None, "requires_safety_checker": False}  # it blacks out class images

    def encode(self, text_encoders: list[torch.nn.Module], ids: list[torch.Tensor]) -> Conditioning:
        (encoder,), (tokens,) = text_encoders, ids
        return Conditioning(encoder(tokens.to(encoder.device))[0])

    def build_tiny(self, cfg: "TinyModelConfig") -> "StableDiffusionPipeline":
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        from rlbooth.families.tiny import tiny_text_encoder, tiny_tokenizer, tiny_unet, tiny_vae

        torch.manual_seed(cfg.seed)
        unet = tiny_unet(cfg, cross_attention_dim=cfg.text_hidden_size)
        vae = tiny_vae(cfg)
        tokenizer = tiny_tokenizer()
        text_encoder = tiny_text_encoder(cfg, tokenizer)
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
