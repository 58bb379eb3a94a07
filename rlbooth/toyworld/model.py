"""The toy world's two base pipelines, in the diffusers classes and folder layouts of real models.

`toyworld` (Stable Diffusion 1.5's layout): a 32 px AutoencoderKL (16 x 16 x 4 latents), a small
UNet2DConditionModel, a two-layer CLIP text encoder and a CLIPTokenizer whose merges make each word of
the world one token. `toyworld-flow` (SD3's layout): the same VAE and tokenizer, an SD3Transformer2DModel
on the flow-matching objective, two CLIP encoders with projections and no T5. The trained weights ship
in `rlbooth/toyworld/weights/` and `weights-flow/` (see `python -m rlbooth.toyworld.pretrain`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rlbooth.resources import data_dir
from rlbooth.toyworld.world import SIZE, WORDS

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Tokenizer

WEIGHTS = data_dir("rlbooth.toyworld") / "weights"
"""The shipped pipeline folder (`StableDiffusionPipeline.from_pretrained(WEIGHTS)` loads it)."""
FLOW_WEIGHTS = data_dir("rlbooth.toyworld") / "weights-flow"
"""The shipped flow-matching pipeline (`StableDiffusion3Pipeline.from_pretrained(FLOW_WEIGHTS)`; draw with
`max_sequence_length=0`, the T5 positions it was trained without)."""
IDENTIFIERS = ("sks",)
"""Rare words in the vocabulary that no caption uses, as `sks` is for Stable Diffusion."""
MAX_TOKENS = 16
"""Token budget of a prompt (the world's captions take at most 8)."""
TEXT_WIDTH = 64


def toy_tokenizer() -> "CLIPTokenizer":
    """Byte-level CLIP tokenizer plus merges that turn every world word into a single token.

    Any other word still tokenizes, character by character, so users can pick another identifier.
    """
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = list(bytes_to_unicode().values())
    vocab += [c + "</w>" for c in vocab]
    merges: list[tuple[str, str]] = []
    for word in sorted(set(WORDS) | set(IDENTIFIERS)):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        # Appended merges rank last, so they never change how an earlier word is split.
        parts = _apply(parts, merges)
        while len(parts) > 1:
            merges.append((parts[0], parts[1]))
            vocab.append(parts[0] + parts[1])
            parts = _apply(parts, merges)
    vocab = list(dict.fromkeys(vocab)) + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges,
                         model_max_length=MAX_TOKENS)


def _apply(parts: list[str], merges: list[tuple[str, str]]) -> list[str]:
    """CLIP's BPE loop: merge the best-ranked adjacent pair until none is a merge."""
    ranks = {m: i for i, m in enumerate(merges)}
    while len(parts) > 1:
        pair = min(zip(parts, parts[1:]), key=lambda p: ranks.get(p, len(ranks)))
        if pair not in ranks:
            break
        merged, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def build_vae() -> "AutoencoderKL":
    from diffusers import AutoencoderKL

    return AutoencoderKL(sample_size=SIZE, in_channels=3, out_channels=3, latent_channels=4,
                         block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def build_unet() -> "UNet2DConditionModel":
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64), norm_num_groups=16, attention_head_dim=8,
        # Attention at 8 x 8 and 4 x 4 only: at 16 x 16 it would triple the cost of a step.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
    )


def build_text_encoder(tokenizer: "CLIPTokenizer") -> "CLIPTextModel":
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def noise_scheduler_config() -> dict:
    """Stable Diffusion's schedule, so the DDIM/DDPO code sees the numbers it sees there."""
    return dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                num_train_timesteps=1000)


FLOW_WIDTH = 128
"""Width of the flow transformer's two streams (four joint-attention layers, heads of 16)."""


def build_transformer() -> "SD3Transformer2DModel":
    """SD3.5's block (RMS q/k norm) at toy size: 2 x 2 patches of the 16 x 16 latents, 64 image tokens."""
    from diffusers import SD3Transformer2DModel

    patch = 2
    return SD3Transformer2DModel(
        sample_size=SIZE // 2, patch_size=patch, in_channels=4, out_channels=4, num_layers=4,
        attention_head_dim=16, num_attention_heads=FLOW_WIDTH // 16, caption_projection_dim=FLOW_WIDTH,
        joint_attention_dim=2 * TEXT_WIDTH, pooled_projection_dim=2 * TEXT_WIDTH,
        pos_embed_max_size=SIZE // 2 // patch, qk_norm="rms_norm")


def build_projected_text_encoder(tokenizer: "CLIPTokenizer") -> "CLIPTextModelWithProjection":
    """SD3's CLIP-L / CLIP-G role: the UNet world's encoder plus the projection that gives the pooled input."""
    from transformers import CLIPTextModelWithProjection

    config = build_text_encoder(tokenizer).config
    config.projection_dim = TEXT_WIDTH
    return CLIPTextModelWithProjection(config)


def no_t5_tokenizer() -> "T5Tokenizer":
    """The flow pipeline has no T5; its `tokenizer_3` says so with `model_max_length=0`, the number of T5
    positions the transformer was trained with (rlbooth reads it, as SD3's pipeline would pad to 256)."""
    from rlbooth.families.tiny_flow import tiny_t5_tokenizer

    return tiny_t5_tokenizer(model_max_length=0)


def flow_scheduler_config() -> dict:
    """No shift: 64 image tokens need none of the extra noise SD3's shift 3 gives its 4096 at 1024 px."""
    return dict(num_train_timesteps=1000, shift=1.0)
