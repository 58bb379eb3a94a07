"""Parts of the tiny Qwen-Image and Z-Image pipelines. Qwen-Image: a byte-level Qwen2 tokenizer built in code
(no download) whose merges make each word of the pipeline's prompt template one token, as Qwen's own
vocabulary does, so the pipeline's fixed count of dropped template tokens (34) holds; a Qwen2.5-VL text
encoder with a one-block vision tower; the Wan-style VAE with a frame axis and Qwen-Image's per-channel
latent statistics. Z-Image: the byte-level tokenizer with Qwen3's chat template, and a Qwen3 decoder."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from diffusers import AutoencoderKLQwenImage
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen3Model

    from rlbooth.config import TinyModelConfig

TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
            "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
            "<|im_start|>assistant\n")
"""QwenImagePipeline's `prompt_template_encode`."""
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TEXT_TOKENS = 64
"""Prompt tokens the tiny tokenizer keeps after the template's 34 (`model_max_length` = 34 + this)."""


def _words(text: str) -> set[str]:
    """The template's words with their leading space, as Qwen's pre-tokenizer splits them."""
    for token in SPECIAL:
        text = text.replace(token, "\n")
    return {w for w in re.findall(r" ?[A-Za-z]+", text) if len(w.strip()) > 1}


def _byte_level(words: set[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges: every byte a token, each of `words` one more (merged left to right), then
    Qwen's special tokens."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    to_unicode = bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(to_unicode.values())}
    merges: list[tuple[str, str]] = []
    for word in sorted(words):
        symbols = [to_unicode[b] for b in word.encode()]
        for end in range(2, len(symbols) + 1):
            left, right = "".join(symbols[:end - 1]), symbols[end - 1]
            if left + right not in vocab:
                vocab[left + right] = len(vocab)
                merges.append((left, right))
    for token in SPECIAL:
        vocab[token] = len(vocab)
    return vocab, merges


def tiny_qwen_tokenizer() -> "Qwen2Tokenizer":
    """Every byte is a token; each template word (and `assistant`) is one more."""
    from transformers import Qwen2Tokenizer

    vocab, merges = _byte_level(_words(TEMPLATE.replace("{}", " ")))
    return Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=34 + TEXT_TOKENS,
                          additional_special_tokens=list(SPECIAL[1:]))


def tiny_qwen_text_encoder(cfg: "TinyModelConfig", tokenizer: "Qwen2Tokenizer"
                           ) -> "Qwen2_5_VLForConditionalGeneration":
    """Qwen2.5-VL's decoder (multimodal rotary sections, grouped KV heads) at the tiny CLIP's width and depth."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    width = cfg.text_hidden_size
    text = dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                num_hidden_layers=cfg.text_layers, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=256,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]},
                bos_token_id=None, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    vision = dict(depth=1, hidden_size=width, intermediate_size=width, num_heads=2, out_hidden_size=width,
                  fullatt_block_indexes=[0])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision)
    return Qwen2_5_VLForConditionalGeneration(config)


def tiny_qwen_vae(cfg: "TinyModelConfig") -> "AutoencoderKLQwenImage":
    """The Wan-style VAE, one spatial halving per extra `vae_channels` entry and none in time, with its
    default (Qwen-Image's) `latents_mean` / `latents_std`."""
    from diffusers import AutoencoderKLQwenImage

    base = cfg.vae_channels[0]
    return AutoencoderKLQwenImage(base_dim=base, z_dim=16, dim_mult=[c // base for c in cfg.vae_channels],
                                  num_res_blocks=1, temperal_downsample=[False] * (len(cfg.vae_channels) - 1))


QWEN3_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                       "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
                       "not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
"""Qwen3's chat template, reduced to what Z-Image's pipeline asks of it (text messages, the generation prompt)."""


def tiny_qwen3_tokenizer() -> "Qwen2Tokenizer":
    """Every byte a token, Qwen's special tokens, Qwen3's chat template; `model_max_length` 64 prompt tokens."""
    from transformers import Qwen2Tokenizer

    vocab, merges = _byte_level(set())
    return Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=TEXT_TOKENS,
                          additional_special_tokens=list(SPECIAL[1:]), chat_template=QWEN3_CHAT_TEMPLATE)


def tiny_qwen3(cfg: "TinyModelConfig", tokenizer: "Qwen2Tokenizer") -> "Qwen3Model":
    """Qwen3's decoder (grouped KV heads, q/k norm) at the tiny CLIP's width and depth."""
    from transformers import Qwen3Config, Qwen3Model

    width = cfg.text_hidden_size
    return Qwen3Model(Qwen3Config(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                                  num_hidden_layers=cfg.text_layers, num_attention_heads=4, num_key_value_heads=2,
                                  head_dim=width // 4, max_position_embeddings=256, bos_token_id=None,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
