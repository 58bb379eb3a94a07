"""Every Hugging Face hub id rlbooth names (defaults, presets, README), with what it holds and its licence.

`tests/test_hub_ids.py` collects the ids from the code, the presets and README and checks that each is
listed here and none is one that the Hub no longer serves, so a renamed or deleted repository is fixed
in one sweep. README's "Model ids and licences" table is written from this list.
"""

from __future__ import annotations

HUB_IDS: dict[str, tuple[str, str]] = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": ("Stable Diffusion 1.5: `model.pretrained`'s default, `sd15*.yaml`",
                                                    "CreativeML OpenRAIL-M"),
    "stabilityai/stable-diffusion-xl-base-1.0": ("SDXL base: `sdxl-lora.yaml`", "CreativeML OpenRAIL++-M"),
    "madebyollin/sdxl-vae-fp16-fix": ("SDXL's VAE fixed for fp16: `sdxl-lora.yaml`'s `model.vae`", "MIT"),
    "stabilityai/stable-diffusion-3.5-medium": ("SD3.5 Medium: `sd35-lora.yaml` (gated)",
                                                "Stability AI Community License"),
    "stabilityai/stable-diffusion-3.5-large": ("SD3.5 Large, named in `sd35-lora.yaml` (gated)",
                                               "Stability AI Community License"),
    "black-forest-labs/FLUX.1-dev": ("FLUX.1-dev: `flux-lora.yaml` (gated)", "FLUX.1 [dev] Non-Commercial License"),
    "Qwen/Qwen-Image": ("Qwen-Image: `qwen-image-lora.yaml`", "Apache-2.0"),
    "facebook/dino-vits16": ("DINO ViT-S/16: `identity_dino`, DreamBench's DINO", "Apache-2.0"),
    "openai/clip-vit-large-patch14": ("CLIP ViT-L/14: `aesthetic`", "MIT"),
    "camenduru/improved-aesthetic-predictor": ("the LAION aesthetic head `sac+logos+ava1-l14-linearMSE.pth`: "
                                               "`aesthetic`", "Apache-2.0"),
    "THUDM/ImageReward": ("ImageReward.pt: `image_reward`, DreamBench", "Apache-2.0"),
    "bert-base-uncased": ("BERT's tokenizer: `image_reward`", "Apache-2.0"),
    "openai/clip-vit-base-patch32": ("CLIP ViT-B/32: `clip_t`, DreamBench's CLIP-I and CLIP-T", "MIT"),
    "yuvalkirstain/PickScore_v1": ("PickScore: `pickscore`, DreamBench", "MIT"),
    "laion/CLIP-ViT-H-14-laion2B-s32B-b79K": ("PickScore's processor", "MIT"),
    "google/dreambooth": ("the DreamBench dataset (`rlbooth eval --dreambench-root hub`)", "CC BY 4.0"),
}
"""Hub id -> (where rlbooth uses it, licence of the weights or data)."""

GONE: dict[str, str] = {
    "runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
}
"""Ids the Hub no longer serves -> their maintained copy (RunwayML deleted its repository in August 2024)."""
