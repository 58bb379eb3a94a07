"""Parts of the tiny flow-matching pipelines (SD3, FLUX) that the UNet families do not have: the 16-channel
VAE without quant convs, and a T5 encoder with a tokenizer built in code (no download)."""

from __future__ import annotations

import string
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from diffusers import AutoencoderKL
    from transformers import T5EncoderModel, T5Tokenizer

    from rlbooth.config import TinyModelConfig

LATENT_CHANNELS = 16
"""SD3's and FLUX's VAEs both have 16 latent channels."""


def tiny_flow_vae(cfg: "TinyModelConfig", scaling_factor: float, shift_factor: float) -> "AutoencoderKL":
    """The SD3 / FLUX VAE layout: 16 latent channels, no quant convs, latents shifted before scaling."""
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    return AutoencoderKL(
        sample_size=cfg.resolution, in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
        block_out_channels=tuple(cfg.vae_channels), layers_per_block=1, norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=scaling_factor, shift_factor=shift_factor,
    )


def tiny_t5_tokenizer(model_max_length: int = 64) -> "T5Tokenizer":
    """A Unigram T5 tokenizer over single characters (with and without the word-start marker), so any
    ASCII prompt tokenizes; ids 0, 1, 2 are <pad>, </s>, <unk> as in T5's own vocabulary. Its 64 positions (as
    the tiny Qwen-Image's and Z-Image's) are what the SD3 and FLUX families pad to (`t5_length`), where the
    pipelines' defaults of 256 and 512 made joint attention most of the tiny models' time."""
    from transformers import T5Tokenizer

    chars = string.ascii_letters + string.digits + string.punctuation
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in chars] + [("\u2581" + c, -2.5) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def tiny_t5(cfg: "TinyModelConfig", tokenizer: "T5Tokenizer", width: int) -> "T5EncoderModel":
    """A T5 v1.1-style encoder (gated GELU, as SD3's and FLUX's T5-XXL) of `width` features; no dropout, so
    a freshly built (train-mode) encoder is deterministic like a loaded one."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=len(tokenizer), d_model=width, d_ff=2 * width, d_kv=width // 4, num_heads=4,
                      num_layers=cfg.text_layers, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                      dropout_rate=0.0, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id)
    return T5EncoderModel(config)
