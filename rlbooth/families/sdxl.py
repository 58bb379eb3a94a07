"""SDXL: two CLIP text encoders whose penultimate hidden states are concatenated on the feature axis,
the second one's pooled projection as `text_embeds`, and the image-size conditioning `time_ids`
(original size, crop top-left, target size) per image, as diffusers' SDXL pipeline and training script."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from rlbooth.families.base import Conditioning, Family, _rows

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLPipeline

    from rlbooth.config import TinyModelConfig


class StableDiffusionXL(Family):
    name = "sdxl"
    pipeline_class_name = "StableDiffusionXLPipeline"
    text_encoders = ("text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")
    load_kwargs = {"add_watermarker": False}

    def encode(self, text_encoders: list[torch.nn.Module], ids: list[torch.Tensor]) -> Conditioning:
        hidden, pooled = [], None
        for encoder, tokens in zip(text_encoders, ids):
            out = encoder(tokens.to(encoder.device), output_hidden_states=True)
            if out[0].ndim == 2:  # the projection model's pooled output; only the last encoder has one
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        if pooled is None:
            raise ValueError("SDXL needs a text encoder with a projection (CLIPTextModelWithProjection) last")
        return Conditioning(torch.cat(hidden, dim=-1), {"text_embeds": pooled})

    def unconditional(self, pipe: Any) -> Conditioning:
        cond = self.encode_prompts(pipe, [""])
        if pipe.config.force_zeros_for_empty_prompt:  # what the pipeline does without a negative prompt
            return cond.map(torch.zeros_like)
        return cond

    def embeds_kwargs(self, cond: Conditioning, uncond: Conditioning) -> dict[str, Any]:
        negative = _rows(uncond, len(cond))
        return {"prompt_embeds": cond.hidden, "pooled_prompt_embeds": cond.added["text_embeds"],
                "negative_prompt_embeds": negative.hidden,
                "negative_pooled_prompt_embeds": negative.added["text_embeds"]}

    def with_geometry(self, cond: Conditioning, geometry: torch.Tensor) -> Conditioning:
        time_ids = geometry.to(cond.hidden.device, cond.hidden.dtype).expand(len(cond), 6)
        return Conditioning(cond.hidden, cond.added | {"time_ids": time_ids})

    def build_tiny(self, cfg: "TinyModelConfig") -> "StableDiffusionXLPipeline":
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

        from rlbooth.families.tiny import tiny_text_encoder, tiny_tokenizer, tiny_unet, tiny_vae

        torch.manual_seed(cfg.seed)
        time_dim = 8
        unet = tiny_unet(cfg, cross_attention_dim=2 * cfg.text_hidden_size, addition_embed_type="text_time",
                         addition_time_embed_dim=time_dim,
                         projection_class_embeddings_input_dim=6 * time_dim + cfg.text_hidden_size)
        vae = tiny_vae(cfg)
        tokenizer, tokenizer_2 = tiny_tokenizer(), tiny_tokenizer()
        text_encoder = tiny_text_encoder(cfg, tokenizer)
        text_encoder_2 = tiny_text_encoder(cfg, tokenizer_2, with_projection=True)
        # SDXL ships an Euler scheduler; stage two samples with DDIM on its schedule.
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           steps_offset=1, timestep_spacing="leading")
        return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                                         scheduler=scheduler, add_watermarker=False)

