"""SD3 / SD3.5: CLIP-L and CLIP-G (penultimate hidden states side by side, zero-padded to T5's width)
followed on the sequence axis by T5's tokens; both CLIP projections side by side as `pooled_projections`.
T5 is optional: without it the pipeline feeds zeros in its place, and so does this family."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from rlbooth.families.base import Conditioning, _rows, tokenize
from rlbooth.families.flowmatch import FlowMatchingFamily

if TYPE_CHECKING:
    from diffusers import StableDiffusion3Pipeline

    from rlbooth.config import TinyModelConfig


class AbsentT5(torch.nn.Module):
    """Stands in for a pipeline's missing T5: zero embeddings of the transformer's `joint_attention_dim`.

    A module rather than None, so code that moves, casts or freezes every text encoder needs no case
    for it; its empty buffer carries the dtype and device that `.to()` gives it.
    """

    def __init__(self, width: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.width = width
        self.register_buffer("anchor", torch.zeros(0, dtype=dtype), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    @property
    def dtype(self) -> torch.dtype:
        return self.anchor.dtype

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.anchor.new_zeros(ids.shape[0], ids.shape[1], self.width),)


class StableDiffusion3(FlowMatchingFamily):
    name = "sd3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    tokenizers = ("tokenizer", "tokenizer_2", "tokenizer_3")
    lora_text_encoders = ("text_encoder", "text_encoder_2")  # what SD3's LoRA loader carries; never T5
    large_text_encoders = ("text_encoder_3",)  # T5-XXL
    max_sequence_length = 256
    script_timestep_density = "logit_normal"  # train_dreambooth_lora_sd3.py: --weighting_scheme logit_normal
    t5_tokenizer, t5_encoder = "tokenizer_3", "text_encoder_3"

    def load(self, source: str, **kwargs: Any) -> "StableDiffusion3Pipeline":
        """A folder saved without T5 (`model_index.json` says null for it) loads with T5 absent, where the
        pipeline class alone asks for `text_encoder_3=None, tokenizer_3=None`."""
        index = self.pipeline_class.load_config(source, **{k: v for k, v in kwargs.items() if k == "revision"})
        for name in ("text_encoder_3", "tokenizer_3"):
            if (index.get(name) or [None])[0] is None:
                kwargs.setdefault(name, None)
        return super().load(source, **kwargs)

    def tokenize(self, pipe: Any, prompts: list[str]) -> list[torch.Tensor]:
        return [tokenize(pipe.tokenizer, prompts), tokenize(pipe.tokenizer_2, prompts),
                self.t5_ids(pipe, prompts)]

    def text_encoder_modules(self, pipe: Any) -> list[torch.nn.Module]:
        t5, clip = pipe.text_encoder_3, pipe.text_encoder
        if t5 is None:
            t5 = AbsentT5(pipe.transformer.config.joint_attention_dim, clip.dtype).to(clip.device)
        return [clip, pipe.text_encoder_2, t5]

    def embeds_kwargs(self, cond: Conditioning, uncond: Conditioning) -> dict[str, Any]:
        negative = _rows(uncond, len(cond))
        return {"prompt_embeds": cond.hidden, "pooled_prompt_embeds": cond.added["pooled_projections"],
                "negative_prompt_embeds": negative.hidden,
                "negative_pooled_prompt_embeds": negative.added["pooled_projections"]}

    def encode(self, text_encoders: list[torch.nn.Module], ids: list[torch.Tensor]) -> Conditioning:
        clip_l, clip_g, t5 = text_encoders
        hidden, pooled = [], []
        for encoder, tokens in zip((clip_l, clip_g), ids):
            out = encoder(tokens.to(encoder.device), output_hidden_states=True)
            pooled.append(out[0])
            hidden.append(out.hidden_states[-2].to(clip_l.dtype))
        t5_hidden = t5(ids[2].to(t5.device))[0].to(t5.dtype)
        clip = torch.cat(hidden, dim=-1)
        clip = F.pad(clip, (0, t5_hidden.shape[-1] - clip.shape[-1]))
        return Conditioning(torch.cat([clip, t5_hidden.to(clip.device)], dim=-2),
                            {"pooled_projections": torch.cat(pooled, dim=-1)})

    def denoise(self, transformer: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor,
                cond: Conditioning) -> torch.Tensor:
        """The velocity at `timesteps` on the scheduler's scale (sigma * 1000), as the pipeline passes them."""
        return transformer(hidden_states=latents, timestep=timesteps, encoder_hidden_states=cond.hidden,
                           pooled_projections=cond.added["pooled_projections"], return_dict=False)[0]

    def build_tiny(self, cfg: "TinyModelConfig", with_t5: bool = True) -> "StableDiffusion3Pipeline":
        """Transformer as wide as the first UNet block, one layer per UNet block, SD3.5's RMS q/k norm;
        T5 (and the joint attention width) four times the CLIP width, as SD3's 4096 against 2 x 768-1280."""
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

        from rlbooth.families.tiny import tiny_text_encoder, tiny_tokenizer
        from rlbooth.families.tiny_flow import LATENT_CHANNELS, tiny_flow_vae, tiny_t5, tiny_t5_tokenizer

        torch.manual_seed(cfg.seed)
        head_dim, joint = 8, 4 * cfg.text_hidden_size
        latent_size = cfg.resolution // 2 ** (len(cfg.vae_channels) - 1)
        transformer = SD3Transformer2DModel(
            sample_size=latent_size, patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
            num_layers=len(cfg.unet_channels), attention_head_dim=head_dim,
            num_attention_heads=cfg.unet_channels[0] // head_dim, caption_projection_dim=cfg.unet_channels[0],
            joint_attention_dim=joint, pooled_projection_dim=2 * cfg.text_hidden_size,
            pos_embed_max_size=latent_size, qk_norm="rms_norm")
        vae = tiny_flow_vae(cfg, scaling_factor=1.5305, shift_factor=0.0609)  # SD3's VAE constants
        tokenizer, tokenizer_2 = tiny_tokenizer(), tiny_tokenizer()
        text_encoder = tiny_text_encoder(cfg, tokenizer, with_projection=True)
        text_encoder_2 = tiny_text_encoder(cfg, tokenizer_2, with_projection=True)
        tokenizer_3 = tiny_t5_tokenizer() if with_t5 else None
        text_encoder_3 = tiny_t5(cfg, tokenizer_3, joint) if tokenizer_3 is not None else None
        return StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
            text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
