"""Loading the base pipeline (hub id, local folder, or the offline tiny model) and LoRA plumbing.

The tiny model is built from `ModelConfig.tiny`, saved as an ordinary diffusers folder and loaded
back with `from_pretrained`, so tests exercise the very code path that loads Stable Diffusion.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from rlbooth.config import ModelConfig, TinyModelConfig
from rlbooth.errors import RlboothError

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusionPipeline

TOYWORLD = "toyworld"
"""`model.pretrained` value naming the toy world's shipped base model (rlbooth.toyworld)."""
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


class ModelLoadError(RlboothError, RuntimeError):
    """The weights could not be had; the message says how to point at a local copy."""


def cache_dir() -> Path:
    """Where rlbooth keeps what it derives (tiny model, class images): `$RLBOOTH_CACHE` or ~/.cache/rlbooth."""
    return Path(os.environ.get("RLBOOTH_CACHE", Path.home() / ".cache" / "rlbooth"))


def model_key(cfg: ModelConfig) -> str:
    """A short stable name for the base model, used to key caches that depend on it."""
    if cfg.pretrained == "tiny":
        spec = json.dumps(cfg.tiny.__dict__, sort_keys=True)
        return "tiny-" + hashlib.sha1(spec.encode()).hexdigest()[:10]
    if cfg.pretrained == TOYWORLD:  # retrained weights must not reuse the old weights' class images
        return "toyworld-" + hashlib.sha1((toyworld_folder() / "unet" / "diffusion_pytorch_model.safetensors")
                                          .read_bytes()).hexdigest()[:10]
    name = f"{cfg.pretrained}@{cfg.revision or 'main'}"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("_")[-80:]


def load_pipeline(cfg: ModelConfig, torch_dtype: "torch.dtype | None" = None) -> "StableDiffusionPipeline":
    """The base pipeline with no safety checker (it blacks out class images)."""
    from diffusers import StableDiffusionPipeline

    if cfg.pretrained == "tiny":
        source = str(tiny_pipeline_folder(cfg.tiny))
    elif cfg.pretrained == TOYWORLD:
        source = str(toyworld_folder())
    else:
        source = cfg.pretrained
    local = Path(source).exists()
    try:
        return StableDiffusionPipeline.from_pretrained(
            source, revision=None if local else cfg.revision, variant=cfg.variant, torch_dtype=torch_dtype,
            safety_checker=None, requires_safety_checker=False,
        )
    except Exception as err:  # hub, network and file errors come in many classes; all mean "no weights"
        if local:
            raise ModelLoadError(f"model.pretrained={source!r}: the folder is not a loadable diffusers "
                                 f"Stable Diffusion pipeline ({type(err).__name__}: {err})") from err
        raise ModelLoadError(
            f"model.pretrained={source!r}: could not load the weights from the Hugging Face hub "
            f"({type(err).__name__}: {err}). Without network access, or for a gated model, download it "
            f"where you can (`hf download {source} --local-dir /path/to/sd`) and pass the folder: "
            f"`--set model.pretrained=/path/to/sd`."
        ) from err


def toyworld_folder() -> Path:
    """The toy world's pretrained pipeline, shipped inside the package."""
    from rlbooth.toyworld.model import WEIGHTS

    if not (WEIGHTS / "model_index.json").is_file():
        raise ModelLoadError(f"model.pretrained={TOYWORLD!r}: the shipped weights are missing from {WEIGHTS}; "
                             "reinstall rlbooth, or rebuild them with `python -m rlbooth.toyworld.pretrain`")
    return WEIGHTS


def tiny_pipeline_folder(cfg: TinyModelConfig) -> Path:
    """Build the tiny pipeline once per spec into the cache; later calls reuse the folder."""
    folder = cache_dir() / "models" / model_key(ModelConfig(pretrained="tiny", tiny=cfg))
    if (folder / "model_index.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=folder.parent))
    build_tiny_pipeline(cfg).save_pretrained(tmp, safe_serialization=True)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished first; its folder is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def build_tiny_pipeline(cfg: TinyModelConfig) -> "StableDiffusionPipeline":
    """A randomly initialized SD-1.5-shaped pipeline small enough for seconds-long CPU steps."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(cfg.seed)
    down_factor = 2 ** (len(cfg.vae_channels) - 1)
    n_unet = len(cfg.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=cfg.resolution // down_factor,
        in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=tuple(cfg.unet_channels),
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n_unet - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n_unet - 1) + ("UpBlock2D",),
        cross_attention_dim=cfg.text_hidden_size, attention_head_dim=8, norm_num_groups=16,
    )
    vae = AutoencoderKL(
        sample_size=cfg.resolution, in_channels=3, out_channels=3, latent_channels=4,
        block_out_channels=tuple(cfg.vae_channels), layers_per_block=1, norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_channels),
    )
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_hidden_size, intermediate_size=2 * cfg.text_hidden_size,
        num_hidden_layers=cfg.text_layers, num_attention_heads=4, max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def tiny_tokenizer():
    """A byte-level CLIP tokenizer with no merges: every character is a token, built without any download."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)


def add_lora(model: "torch.nn.Module", rank: int, alpha: float | None, target_modules: list[str],
             adapter_name: str = "default", zero_init: bool = False) -> None:
    """Attach a peft LoRA adapter; only its weights are left trainable.

    `zero_init` zeroes both factors' product (B = 0, peft's default), so the model is unchanged at step 0.
    A transformers model (the text encoder) gets the adapter from peft itself: transformers' own
    `add_adapter` refuses peft < 0.22 from 5.24 on, and pip finds no peft 0.22 (2026-12-02).
    """
    from diffusers import ModelMixin
    from peft import LoraConfig, inject_adapter_in_model

    model.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=target_modules,
                        init_lora_weights=True if zero_init else "gaussian")
    if isinstance(model, ModelMixin):
        model.add_adapter(config, adapter_name=adapter_name)
    else:
        inject_adapter_in_model(config, model, adapter_name=adapter_name)


def save_lora(folder: Path, unet: "torch.nn.Module", text_encoder: "torch.nn.Module | None" = None,
              adapter_name: str = "default") -> None:
    """Write `pytorch_lora_weights.safetensors` in the layout `pipe.load_lora_weights(folder)` reads.

    The adapters' configs go in as metadata, so a loader applies the trained alpha / rank, not 1.
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    def layers(model: "torch.nn.Module | None"):
        if model is None:
            return None
        return convert_state_dict_to_diffusers(get_peft_model_state_dict(model, adapter_name=adapter_name))

    def config(model: "torch.nn.Module | None"):
        return None if model is None else model.peft_config[adapter_name].to_dict()

    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers(unet),
                                              text_encoder_lora_layers=layers(text_encoder),
                                              unet_lora_adapter_metadata=config(unet),
                                              text_encoder_lora_adapter_metadata=config(text_encoder),
                                              safe_serialization=True)
