"""Qwen-Image: a Qwen2.5-VL decoder's last hidden states as the sequence, the prompt wrapped in the pipeline's
chat template whose first 34 tokens are dropped, an attention mask kept per prompt; a Wan-style VAE whose
latents carry a frame axis and are normalized per channel; the transformer on 2x2-packed latents; true
classifier-free guidance with a negative prompt, rescaled to the conditional prediction's norm per token.

rlbooth keeps the latents as (B, C, H, W): the frame axis exists only inside the VAE calls (base.py's
`latent_dist` / `decode_latents`). Prompts are padded to one length (`text_length`) with the mask marking the
padding, so conditionings of different prompts stack into one batch, as CFG's and stage two's batches need;
the pipeline pads to the longest prompt instead, and masked positions change nothing but rounding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from rlbooth.families.base import Conditioning, _rows
from rlbooth.families.flowmatch import FlowMatchingFamily, linear_sigmas
from rlbooth.families.flux import pack, unpack

if TYPE_CHECKING:
    from diffusers import QwenImagePipeline

    from rlbooth.config import TinyModelConfig

DROPPED_TOKENS = 34
"""QwenImagePipeline's `prompt_template_encode_start_idx`: the template's tokens before the prompt."""
NEGATIVE_PROMPT = " "
"""The negative prompt of the unconditional rows; the pipeline runs no CFG without one, and its examples
pass this."""
MASK = "encoder_hidden_states_mask"


class QwenImage(FlowMatchingFamily):
    name = "qwenimage"
    script_timestep_density = "uniform"  # train_dreambooth_lora_qwen_image.py: --weighting_scheme none
    pipeline_class_name = "QwenImagePipeline"
    lora_text_encoders = ()  # diffusers' Qwen-Image LoRA loader carries the transformer only
    large_text_encoders = ("text_encoder",)  # Qwen2.5-VL-7B
    max_sequence_length = 512

    def text_length(self, pipe: Any) -> int:
        """Prompt positions after the template: the pipeline's `max_sequence_length`, or fewer where the
        tokenizer's `model_max_length` says so (the tiny model: 64)."""
        return min(self.max_sequence_length, pipe.tokenizer.model_max_length - DROPPED_TOKENS)

    def t5_length(self, pipe: Any) -> int:  # the pipeline's `max_sequence_length` (call_kwargs)
        return self.text_length(pipe)

    def tokenize(self, pipe: Any, prompts: list[str]) -> list[torch.Tensor]:
        """Template-wrapped ids and their attention mask, right-padded to the template plus `text_length`."""
        tokens = pipe.tokenizer([pipe.prompt_template_encode.format(p) for p in prompts], padding="max_length",
                                max_length=DROPPED_TOKENS + self.text_length(pipe), truncation=True,
                                padding_side="right", return_tensors="pt")
        return [tokens.input_ids, tokens.attention_mask]

    def encode(self, text_encoders: list[torch.nn.Module], ids: list[torch.Tensor]) -> Conditioning:
        (encoder,), (tokens, mask) = text_encoders, ids
        mask = mask.to(encoder.device)
        out = encoder(input_ids=tokens.to(encoder.device), attention_mask=mask, output_hidden_states=True)
        mask = mask[:, DROPPED_TOKENS:]
        hidden = out.hidden_states[-1][:, DROPPED_TOKENS:] * mask.unsqueeze(-1).to(encoder.dtype)
        return Conditioning(hidden.to(encoder.dtype), {MASK: mask})

    def unconditional(self, pipe: Any) -> Conditioning:
        return self.encode_prompts(pipe, [NEGATIVE_PROMPT])

    def guidance_kwargs(self, guidance_scale: float) -> dict[str, Any]:
        """True CFG at `guidance_scale` against the negative prompt; the pipeline's `guidance_scale` is for
        guidance-distilled transformers only."""
        return {"true_cfg_scale": guidance_scale, "negative_prompt": NEGATIVE_PROMPT}

    def embeds_kwargs(self, cond: Conditioning, uncond: Conditioning) -> dict[str, Any]:
        """The negative prompt's embedding replaces its text (`guidance_kwargs`)."""
        negative = _rows(uncond, len(cond))
        return {"prompt_embeds": cond.hidden, "prompt_embeds_mask": cond.added[MASK],
                "negative_prompt": None, "negative_prompt_embeds": negative.hidden,
                "negative_prompt_embeds_mask": negative.added[MASK]}

    def denoise(self, transformer: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor,
                cond: Conditioning) -> torch.Tensor:
        """The velocity of (B, C, H, W) latents, unpacked; `timesteps` on the scheduler's scale (sigma * 1000),
        which the transformer takes divided by 1000."""
        batch, height, width = latents.shape[0], *latents.shape[-2:]
        out = transformer(hidden_states=pack(latents), timestep=timesteps.to(latents.dtype) / 1000,
                          encoder_hidden_states=cond.hidden, encoder_hidden_states_mask=cond.added[MASK],
                          img_shapes=[[(1, height // 2, width // 2)]] * batch, return_dict=False)[0]
        return unpack(out, height, width)

    def guide(self, uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
        """The pipeline's true CFG: the combination rescaled, per packed token, to the conditional norm."""
        height, width = cond.shape[-2:]
        uncond, cond = pack(uncond), pack(cond)
        combined = uncond + scale * (cond - uncond)
        rescaled = combined * (cond.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))
        return unpack(rescaled, height, width)

    def image_seq_len(self, pipe: Any, height: int, width: int) -> int:
        return (height // 2) * (width // 2)

    def sampling_sigmas(self, num_steps: int) -> list[float] | None:
        return linear_sigmas(num_steps)

    def build_tiny(self, cfg: "TinyModelConfig") -> "QwenImagePipeline":
        """Transformer as wide as the first UNet block (heads of 16), one layer per UNet block, on the text
        encoder's width; the scheduler configured as Qwen-Image's (dynamic shift up to 0.9, terminal 0.02)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel

        from rlbooth.families.tiny_flow import LATENT_CHANNELS
        from rlbooth.families.tiny_qwen import tiny_qwen_text_encoder, tiny_qwen_tokenizer, tiny_qwen_vae

        torch.manual_seed(cfg.seed)
        head_dim = 16
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=4 * LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
            num_layers=len(cfg.unet_channels), attention_head_dim=head_dim,
            num_attention_heads=cfg.unet_channels[0] // head_dim, joint_attention_dim=cfg.text_hidden_size,
            axes_dims_rope=(4, 6, 6))
        tokenizer = tiny_qwen_tokenizer()
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
            max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")
        return QwenImagePipeline(scheduler=scheduler, vae=tiny_qwen_vae(cfg),
                                 text_encoder=tiny_qwen_text_encoder(cfg, tokenizer), tokenizer=tokenizer,
                                 transformer=transformer)
