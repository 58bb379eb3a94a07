"""Parts of the tiny offline pipelines, built from `TinyModelConfig` without any download."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from rlbooth.config import TinyModelConfig


def tiny_unet(cfg: "TinyModelConfig", cross_attention_dim: int, **extra: Any) -> "UNet2DConditionModel":
    from diffusers import UNet2DConditionModel

    n = len(cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=cfg.resolution // 2 ** (len(cfg.vae_channels) - 1),
        in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=tuple(cfg.unet_channels),
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=16, **extra,
    )


def tiny_vae(cfg: "TinyModelConfig") -> "AutoencoderKL":
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        sample_size=cfg.resolution, in_channels=3, out_channels=3, latent_channels=4,
        block_out_channels=tuple(cfg.vae_channels), layers_per_block=1, norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_channels),
    )


def tiny_text_encoder(cfg: "TinyModelConfig", tokenizer: "CLIPTokenizer", with_projection: bool = False
                      ) -> "CLIPTextModel":
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_hidden_size, intermediate_size=2 * cfg.text_hidden_size,
        num_hidden_layers=cfg.text_layers, num_attention_heads=4, max_position_embeddings=77,
        projection_dim=cfg.text_hidden_size,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def tiny_tokenizer() -> "CLIPTokenizer":
    """A byte-level CLIP tokenizer with no merges: every character is a token, built without any download."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)
