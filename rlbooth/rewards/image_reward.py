"""ImageReward (Xu et al. 2023), ported onto transformers' own BLIP classes.

The PyPI package `image-reward` does not import under transformers 5, but its model is a BLIP
image-grounded text encoder that `BlipForImageTextRetrieval` reproduces layer for layer:

- vision: ViT-L/16 at 224 px (hidden 1024, 24 layers, 16 heads, MLP 4096, layer-norm eps 1e-6), the
  final layer norm applied to every token (BLIP's `visual_encoder.norm` = `post_layernorm`);
- text: BERT (hidden 768, 12 layers, 12 heads) with cross-attention onto the image tokens in every
  layer, vocab 30524 = bert-base-uncased + `[DEC]` (bos) + `[ENC]`, prompts padded/truncated to 35;
- reward: a linear MLP 768-1024-128-64-16-1 (dropout only, no activations) on the first token's last
  hidden state, then `(r - 0.16717362830052426) / 1.0333394966054072`.

The first token is the tokenizer's own `[CLS]`: the original inference code (`ImageReward.score`,
`inference_rank`) and its training code feed `tokenizer(...).input_ids` unchanged to the text encoder;
only BLIP's ITM head swaps `input_ids[:, 0]` for `[ENC]`, which ImageReward never does. transformers'
`BlipTextModel` does not touch the ids either, so passing the tokenizer's output as is matches.

Preprocessing is the original's Resize(224, bicubic) / CenterCrop(224) / ToTensor / CLIP mean-std on a
PIL image: the 8-bit copy of each image is resized by PIL itself (`rlbooth.rewards.pil_resize`), so the
pixels are the original's; cropping and normalizing run batched on the model's device. The reward is
differentiable: under grad mode, images that require grad are resized by torch instead and the scores
stay connected to them (`rlbooth.rewards.grad_path`).

`convert_image_reward_state_dict` renames the `ImageReward.pt` keys as transformers' BLIP conversion
script does; the model is then loaded strictly: only heads the reward never runs may be missing.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rlbooth.rewards import RewardError, register, validate_batch
from rlbooth.rewards import common
from rlbooth.rewards.hub import load_or_explain
from rlbooth.rewards.grad_path import place, resize, wanted
from rlbooth.rewards.pil_resize import normalize

if TYPE_CHECKING:
    from transformers import BlipConfig, BlipForImageTextRetrieval

REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
TEXT_LENGTH = 35  # the original tokenizes with padding="max_length", truncation=True, max_length=35
CHECKPOINT_FILE = "ImageReward.pt"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# BLIP_Pretrain(image_size=224, vit="large") with ImageReward's med_config.json, as BlipConfig arguments.
IMAGE_REWARD_CONFIG: dict[str, Any] = {
    "vision_config": {
        "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
        "image_size": 224, "patch_size": 16, "hidden_act": "gelu", "layer_norm_eps": 1e-6,
    },
    "text_config": {
        "vocab_size": 30524, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
        "num_attention_heads": 12, "max_position_embeddings": 512, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
        "pad_token_id": 0, "bos_token_id": 30522, "sep_token_id": 102,
        "is_decoder": True,  # transformers builds the cross-attention layers only for a "decoder" config
    },
    "image_text_hidden_size": 256,  # BLIP_Pretrain's embed_dim: vision_proj / text_proj (unused here)
}


# Original key (full match) -> where it goes ("blip", "mlp", or None to drop) and its new name.
# First match wins, so the position_ids drop comes before the 1:1 text-encoder rule.
RENAME_RULES: tuple[tuple[str, str | None, str], ...] = (
    (r"blip\.text_encoder\.embeddings\.position_ids", None, ""),
    (r"blip\.visual_encoder\.cls_token", "blip", "vision_model.embeddings.class_embedding"),
    (r"blip\.visual_encoder\.pos_embed", "blip", "vision_model.embeddings.position_embedding"),
    (r"blip\.visual_encoder\.patch_embed\.proj\.(weight|bias)", "blip", r"vision_model.embeddings.patch_embedding.\1"),
    (r"blip\.visual_encoder\.blocks\.(\d+)\.norm([12])\.(weight|bias)", "blip",
     r"vision_model.encoder.layers.\1.layer_norm\2.\3"),
    (r"blip\.visual_encoder\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)", "blip",
     r"vision_model.encoder.layers.\1.self_attn.qkv.\2"),
    (r"blip\.visual_encoder\.blocks\.(\d+)\.attn\.proj\.(weight|bias)", "blip",
     r"vision_model.encoder.layers.\1.self_attn.projection.\2"),
    (r"blip\.visual_encoder\.blocks\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", "blip",
     r"vision_model.encoder.layers.\1.mlp.\2.\3"),
    (r"blip\.visual_encoder\.norm\.(weight|bias)", "blip", r"vision_model.post_layernorm.\1"),
    (r"blip\.text_encoder\.(.+)", "blip", r"text_encoder.\1"),
    (r"blip\.(vision_proj|text_proj)\.(weight|bias)", "blip", r"\1.\2"),
    (r"mlp\.layers\.(\d+)\.(weight|bias)", "mlp", r"layers.\1.\2"),
)

# Parts of BlipForImageTextRetrieval the reward never runs; the checkpoint need not hold them.
# ImageReward.pt has no ITM head; BLIP_Pretrain does define vision_proj/text_proj, so they normally load.
UNUSED_PREFIXES = ("itm_head.", "vision_proj.", "text_proj.")


def _field(option: str) -> str:
    return f"align.reward_options.image_reward.{option}"


def convert_image_reward_state_dict(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Renames an `ImageReward.pt` state dict into (BlipForImageTextRetrieval keys, common.ScoreMLP keys).

    A key no rule matches is passed through unchanged into the BLIP dict, so a strict load reports it as
    unexpected together with everything else that does not fit.
    """
    blip: dict[str, torch.Tensor] = {}
    head: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        for pattern, target, replacement in RENAME_RULES:
            match = re.fullmatch(pattern, key)
            if match is None:
                continue
            if target == "blip":
                blip[match.expand(replacement)] = value
            elif target == "mlp":
                head[match.expand(replacement)] = value
            break
        else:
            blip[key] = value
    return blip, head


def blip_config(override: Mapping[str, Any] | None = None) -> BlipConfig:
    """ImageReward's BlipConfig; `override` replaces entries (sub-config dicts are merged key by key)."""
    from transformers import BlipConfig

    options = copy.deepcopy(IMAGE_REWARD_CONFIG)
    if override is not None:
        if not isinstance(override, Mapping):
            raise RewardError(f"{_field('config')} must be a mapping of BlipConfig options or null, "
                              f"got {type(override).__name__}")
        for key, value in override.items():
            if key in ("vision_config", "text_config") and isinstance(value, Mapping):
                options[key] = {**options[key], **value}
            else:
                options[key] = copy.deepcopy(value)
    try:
        return BlipConfig(**options)
    except Exception as err:  # strict dataclass validation: wrong names or types
        raise RewardError(f"{_field('config')}: not a valid BlipConfig ({type(err).__name__}: {err})") from err


def _empty_blip(config: BlipConfig) -> BlipForImageTextRetrieval:
    """The model with uninitialized weights (a checkpoint overwrites them), in a fraction of a second.

    Built on the meta device, then given real storage. Non-persistent buffers are in no checkpoint and
    must be filled here; only the text position ids exist today, so anything else falls back to a normal
    (randomly initialized, several seconds for ViT-L) construction.
    """
    from transformers import BlipForImageTextRetrieval

    with torch.device("meta"):
        model = BlipForImageTextRetrieval(config)
    persistent = set(model.state_dict())
    transient = {name for name, _ in model.named_buffers() if name not in persistent}
    if transient != {"text_encoder.embeddings.position_ids"}:
        return BlipForImageTextRetrieval(config)
    model = model.to_empty(device="cpu")
    ids = model.text_encoder.embeddings.position_ids
    with torch.no_grad():
        ids.copy_(torch.arange(ids.shape[-1]).expand_as(ids))
    return model


def _checkpoint_file(checkpoint: str) -> Path:
    """A local `.pt` file, a local folder holding `ImageReward.pt`, or a hub repo id holding it."""
    local = Path(checkpoint).expanduser()
    if local.is_file():
        return local
    if local.is_dir():
        if (local / CHECKPOINT_FILE).is_file():
            return local / CHECKPOINT_FILE
        raise RewardError(f"{_field('checkpoint')}={checkpoint!r}: the folder holds no {CHECKPOINT_FILE}")
    if checkpoint.startswith(("/", ".", "~")) or checkpoint.endswith((".pt", ".pth")):
        raise RewardError(f"{_field('checkpoint')}={checkpoint!r}: no such file")

    def download(repo_id: str) -> Path:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id=repo_id, filename=CHECKPOINT_FILE))

    return load_or_explain(download, checkpoint, _field("checkpoint"))


def _read_checkpoint(checkpoint: str) -> dict[str, torch.Tensor]:
    path = _checkpoint_file(checkpoint)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RewardError(f"{_field('checkpoint')}={checkpoint!r}: could not read {path} "
                          f"({type(err).__name__}: {err})") from err
    for wrapper in ("state_dict", "model"):  # training checkpoints sometimes nest the weights
        if isinstance(state, dict) and set(state) == {wrapper} and isinstance(state[wrapper], dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RewardError(f"{_field('checkpoint')}={checkpoint!r}: {path} is not a state dict of tensors")
    return state


def _listing(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _check_keys(what: str, checkpoint: str, expected: Mapping[str, torch.Tensor],
                given: Mapping[str, torch.Tensor], allowed_missing: tuple[str, ...] = ()) -> list[str]:
    """Raises unless `given` fits `expected` in names and shapes; returns the tolerated missing keys."""
    missing = sorted(set(expected) - set(given))
    tolerated = [key for key in missing if key.startswith(allowed_missing)]
    missing = [key for key in missing if not key.startswith(allowed_missing)]
    unexpected = sorted(set(given) - set(expected))
    wrong = sorted(f"{key} {tuple(given[key].shape)} (model: {tuple(expected[key].shape)})"
                   for key in set(given) & set(expected) if given[key].shape != expected[key].shape)
    problems = []
    if missing:
        problems.append(f"missing keys [{_listing(missing)}]")
    if unexpected:
        problems.append(f"unexpected keys [{_listing(unexpected)}]")
    if wrong:
        problems.append(f"shape mismatches [{_listing(wrong)}] (does `config` fit this checkpoint?)")
    if problems:
        raise RewardError(f"{_field('checkpoint')}={checkpoint!r} does not load into ImageReward's {what}: "
                          + "; ".join(problems))
    return tolerated


def _load_tokenizer(name: str, vocab_size: int) -> Any:
    def load(mid: str) -> Any:
        from transformers import BertTokenizer

        return BertTokenizer.from_pretrained(mid)

    tokenizer = load_or_explain(load, name, _field("tokenizer"))
    # BLIP's init_tokenizer: bert-base-uncased + [DEC] as bos + [ENC] as an extra special token.
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    if len(tokenizer) != vocab_size:
        raise RewardError(f"{_field('tokenizer')}={name!r} has {len(tokenizer)} tokens with [DEC] and [ENC]; "
                          f"ImageReward's text encoder has {vocab_size} (bert-base-uncased + 2)")
    return tokenizer


def preprocess(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 3, size, size): the original's Resize(size, BICUBIC) / CenterCrop(size) /
    ToTensor / Normalize(CLIP mean, std) on the images' 8-bit copies, resized by PIL as torchvision does (by torch
    when gradients are wanted: `rlbooth.rewards.grad_path`)."""
    height, width = images.shape[-2:]
    if height <= width:  # torchvision: the shorter side becomes `size`, the longer int(size * long / short)
        target = (size, int(size * width / height))
    else:
        target = (int(size * height / width), size)
    images = resize(images, target)
    top, left = round((target[0] - size) / 2), round((target[1] - size) / 2)  # torchvision: int(round(.))
    return normalize(images[..., top:top + size, left:left + size], CLIP_MEAN, CLIP_STD)


class ImageRewardScorer:
    """ImageReward on a batch of (image, prompt) pairs: (B,) float32 on the CPU, or connected to images that want
    gradients (`grad_path.wanted`) on their device.

    `raw` is the MLP output before ImageReward's normalization; calling returns `(raw - mean) / std`.
    `ignored_missing_keys` lists the unused model keys the checkpoint did not hold (the ITM head).
    """

    def __init__(self, model: BlipForImageTextRetrieval, head: common.ScoreMLP, tokenizer: Any,
                 batch_size: int = 16, ignored_missing_keys: list[str] | None = None):
        self.model, self.head, self.tokenizer, self.batch_size = model, head, tokenizer, batch_size
        self.ignored_missing_keys = list(ignored_missing_keys or [])
        self.dtype = model.dtype
        self.torch_modules = [model, head]
        self.image_size = int(model.config.vision_config.image_size)
        self.text_length = min(TEXT_LENGTH, int(model.config.text_config.max_position_embeddings))

    @property
    def device(self) -> torch.device:
        """Where the model is now: inputs follow it when `align.offload_rewards` moves it."""
        return self.model.device

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return preprocess(images, self.image_size)

    def tokenize(self, prompts: list[str]) -> Any:
        return self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.text_length,
                              return_tensors="pt").to(self.device)

    def features(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """First-token last hidden state of the image-grounded text encoder, float32, (B, text hidden)."""
        grad = wanted(images)
        out = []
        with torch.set_grad_enabled(grad):
            for start in range(0, len(prompts), self.batch_size):
                chunk = images[start:start + self.batch_size]
                pixels = self.preprocess((chunk if grad else chunk.detach()).to(self.device)).to(self.dtype)
                image_embeds = self.model.vision_model(pixel_values=pixels).last_hidden_state
                image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
                tokens = self.tokenize(prompts[start:start + self.batch_size])
                text = self.model.text_encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                                               encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts)
                out.append(text.last_hidden_state[:, 0, :].float())
        return torch.cat(out)

    def raw(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        with torch.set_grad_enabled(wanted(images)):
            return place(self.head(self.features(images, prompts)).squeeze(-1), images)

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        if not validate_batch(images, prompts, metadata):
            return torch.zeros(0)
        return (self.raw(images, list(prompts)) - REWARD_MEAN) / REWARD_STD


def load_image_reward(checkpoint: str = "THUDM/ImageReward", tokenizer: str = "bert-base-uncased",
                      device: str = "cpu", dtype: str = "float32", batch_size: int = 16,
                      config: Mapping[str, Any] | None = None) -> ImageRewardScorer:
    """Builds the model from `config`, loads the converted checkpoint strictly, and the tokenizer."""
    torch_dtype = common.torch_dtype(dtype, _field("dtype"))
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise RewardError(f"{_field('batch_size')}={batch_size!r}: must be an integer of at least 1")
    blip_cfg = blip_config(config)
    state = _read_checkpoint(checkpoint)
    blip_state, head_state = convert_image_reward_state_dict(state)
    del state

    model = _empty_blip(blip_cfg)
    ignored = _check_keys("BLIP model", checkpoint, model.state_dict(), blip_state, UNUSED_PREFIXES)
    model.load_state_dict(blip_state, strict=False)
    with torch.no_grad():
        for key in ignored:  # unused heads: defined values instead of uninitialized memory
            model.get_parameter(key).zero_()
    del blip_state

    head = common.ScoreMLP(blip_cfg.text_config.hidden_size)
    _check_keys("reward MLP", checkpoint, head.state_dict(), head_state)
    head.load_state_dict(head_state)

    text_tokenizer = _load_tokenizer(tokenizer, blip_cfg.text_config.vocab_size)
    try:
        model = model.to(device=device, dtype=torch_dtype).eval().requires_grad_(False)
        head = head.to(device).eval().requires_grad_(False)  # the MLP runs in float32, as the original's .float()
    except Exception as err:
        raise RewardError(f"{_field('device')}={device!r}: cannot place ImageReward there "
                          f"({type(err).__name__}: {err})") from err
    return ImageRewardScorer(model, head, text_tokenizer, batch_size, ignored)


@register("image_reward", differentiable=True)
def image_reward(checkpoint: str = "THUDM/ImageReward", tokenizer: str = "bert-base-uncased", device: str = "cpu",
                 dtype: str = "float32", batch_size: int = 16,
                 config: Mapping[str, Any] | None = None) -> ImageRewardScorer:
    """ImageReward human-preference score (about -2..2; 0 is the mean over its training set).

    `checkpoint`: a hub repo holding `ImageReward.pt` (THUDM/ImageReward), a local `.pt` file or a folder
    holding it; `tokenizer`: bert-base-uncased or a local copy; `config`: BlipConfig overrides (tests use
    a tiny architecture). The BLIP model runs in `dtype`, the MLP in float32.
    """
    return load_image_reward(checkpoint, tokenizer, device, dtype, batch_size, config)
