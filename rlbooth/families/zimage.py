"""Z-Image: a Qwen3 decoder's second-to-last hidden states as the sequence, the prompt in Qwen3's chat template
(thinking on), only each prompt's own tokens passed on; the single-stream S3-DiT takes lists of (C, 1, H, W)
latents and of caption features, the time as 1 - sigma, and predicts x0 - eps (the pipeline negates it);
CFG as cond + scale (cond - uncond); the FLUX-style VAE (shift, then scale).

Prompts are padded to `text_length` as the pipeline pads them, with the mask kept in the conditioning, so
they batch like any family's; `denoise` passes each row's unmasked tokens, as the pipeline does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from rlbooth.families.base import Conditioning, _rows
from rlbooth.families.flowmatch import FlowMatchingFamily

if TYPE_CHECKING:
    from diffusers import ZImagePipeline

    from rlbooth.config import TinyModelConfig

MASK = "attention_mask"


class ZImage(FlowMatchingFamily):
    name = "zimage"
    script_timestep_density = "uniform"  # no Z-Image DreamBooth script compared here: Qwen-Image's default
    pipeline_class_name = "ZImagePipeline"
    lora_text_encoders = ()  # diffusers' Z-Image LoRA loader carries the transformer only
    large_text_encoders = ("text_encoder",)  # Qwen3-4B
    max_sequence_length = 512

    def text_length(self, pipe: Any) -> int:
        """Token positions per prompt, template included: the pipeline's `max_sequence_length`, or fewer where
        the tokenizer's `model_max_length` says so (the tiny model: 64)."""
        return min(self.max_sequence_length, pipe.tokenizer.model_max_length)

    def t5_length(self, pipe: Any) -> int:  # the pipeline's `max_sequence_length` (call_kwargs)
        return self.text_length(pipe)

    def tokenize(self, pipe: Any, prompts: list[str]) -> list[torch.Tensor]:
        texts = [pipe.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                    add_generation_prompt=True, enable_thinking=True)
                 for p in prompts]
        tokens = pipe.tokenizer(texts, padding="max_length", max_length=self.text_length(pipe), truncation=True,
                                return_tensors="pt")
        return [tokens.input_ids, tokens.attention_mask]

    def encode(self, text_encoders: list[torch.nn.Module], ids: list[torch.Tensor]) -> Conditioning:
        (encoder,), (tokens, mask) = text_encoders, ids
        mask = mask.to(encoder.device)
        hidden = encoder(input_ids=tokens.to(encoder.device), attention_mask=mask.bool(),
                         output_hidden_states=True).hidden_states[-2]
        return Conditioning(hidden * mask.unsqueeze(-1).to(hidden.dtype), {MASK: mask})

    def embeds_kwargs(self, cond: Conditioning, uncond: Conditioning) -> dict[str, Any]:
        """The pipeline takes each prompt's tokens without the padding, as `denoise` gives them."""
        return {"prompt_embeds": captions(cond), "negative_prompt_embeds": captions(_rows(uncond, len(cond)))}

    def denoise(self, transformer: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor,
                cond: Conditioning) -> torch.Tensor:
        """The velocity eps - x0 of (B, C, H, W) latents at `timesteps` on the scheduler's scale (sigma * 1000)."""
        out = transformer(list(latents.unsqueeze(2).unbind(0)), (1000 - timesteps.to(latents.dtype)) / 1000,
                          captions(cond), return_dict=False)[0]
        return -torch.stack(out).squeeze(2)

    def guide(self, uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
        """The pipeline's CFG: its scale s is the usual scale minus one."""
        return cond + scale * (cond - uncond)

    def image_seq_len(self, pipe: Any, height: int, width: int) -> int:
        return (height // 2) * (width // 2)

    def sampling_sigmas(self, num_steps: int) -> list[float] | None:
        return torch.linspace(1.0, 1 / num_steps, num_steps).tolist()

    def build_tiny(self, cfg: "TinyModelConfig") -> "ZImagePipeline":
        """Transformer as wide as the first UNet block (heads of 16), one main and one refiner layer per UNet
        block after the first, on the text encoder's width; Z-Image's static shift 3."""
        from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

        from rlbooth.families.tiny_flow import LATENT_CHANNELS, tiny_flow_vae
        from rlbooth.families.tiny_qwen import tiny_qwen3, tiny_qwen3_tokenizer

        torch.manual_seed(cfg.seed)
        head_dim = 16
        heads = cfg.unet_channels[0] // head_dim
        transformer = ZImageTransformer2DModel(
            in_channels=LATENT_CHANNELS, dim=cfg.unet_channels[0], n_layers=len(cfg.unet_channels),
            n_refiner_layers=1, n_heads=heads, n_kv_heads=heads, cap_feat_dim=cfg.text_hidden_size,
            axes_dims=[4, 6, 6], axes_lens=[1024, 512, 512])  # Z-Image's position tables
        tokenizer = tiny_qwen3_tokenizer()
        return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer,
                              vae=tiny_flow_vae(cfg, scaling_factor=0.3611, shift_factor=0.1159),  # FLUX's VAE
                              text_encoder=tiny_qwen3(cfg, tokenizer), tokenizer=tokenizer)


def captions(cond: Conditioning) -> list[torch.Tensor]:
    """Each prompt's token states without the padding: the transformer's and the pipeline's input."""
    return [hidden[mask.bool()] for hidden, mask in zip(cond.hidden, cond.added[MASK])]
