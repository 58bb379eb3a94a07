"""CLIP-based rewards: the LAION aesthetic predictor, CLIP-T alignment and PickScore.

All three share one path: a `CLIPModel` loaded once (hub id or local folder), images preprocessed as
CLIPImageProcessor does (8-bit copy, shorter side resized by PIL's bicubic, center crop, normalized
with the processor's mean/std on the reward's device), text tokenized with the processor's CLIP
tokenizer to 77 tokens, and embeddings L2-normalized in float32. transformers is imported inside the
factories only. All three are differentiable: under grad mode, images that require grad are resized by
torch instead of PIL and the scores stay connected to them (`rlbooth.rewards.grad_path`).

transformers 5 returns an output object from `get_image_features` / `get_text_features`; the
projected embedding is its `.pooler_output` (older versions returned the tensor; both are handled).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rlbooth.rewards import RewardError, RewardFn, register, validate_batch
from rlbooth.rewards import common
from rlbooth.rewards.hub import load_or_explain
from rlbooth.rewards.grad_path import place, resize, wanted
from rlbooth.rewards.pil_resize import normalize

if TYPE_CHECKING:
    from transformers import CLIPModel

# OpenAI CLIP's normalization, used when a local model folder carries no preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TEXT_LENGTH = 77  # CLIP's context length

AESTHETIC_HEAD = "camenduru/improved-aesthetic-predictor/sac+logos+ava1-l14-linearMSE.pth"


def _field(reward: str, option: str) -> str:
    return f"align.reward_options.{reward}.{option}"


def _check_batch_size(batch_size: int, reward: str) -> None:
    if batch_size < 1:
        raise RewardError(f"{_field(reward, 'batch_size')}={batch_size}: must be at least 1")


@dataclass(frozen=True)
class ClipPreprocess:
    """CLIPImageProcessor's resize / center crop / normalize of tensors in [0, 1], on their 8-bit copy.

    `resize` is the shorter side's target length (an int) or an exact (height, width); `crop` is (height, width).
    The resize is PIL's bicubic (`rlbooth.rewards.pil_resize`), so pixels equal the processor's own; torch's
    when gradients are wanted (`rlbooth.rewards.grad_path`).
    """

    resize: int | tuple[int, int]
    crop: tuple[int, int]
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        if isinstance(self.resize, tuple):
            return self.resize
        # transformers' get_resize_output_image_size(default_to_square=False): the long side is truncated.
        if height <= width:
            return self.resize, int(self.resize * width / height)
        return int(self.resize * height / width), self.resize

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = resize(images, self.output_size(*images.shape[-2:]))
        crop_h, crop_w = self.crop
        height, width = images.shape[-2:]
        if height < crop_h or width < crop_w:
            raise RewardError(f"images resized to {height}x{width} are smaller than the {crop_h}x{crop_w} crop")
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        return normalize(images[..., top:top + crop_h, left:left + crop_w], self.mean, self.std)

    @classmethod
    def from_config(cls, config: dict[str, Any], image_size: int) -> ClipPreprocess:
        """From a preprocessor_config.json dict (old int sizes or new dict sizes); `image_size` fills gaps."""

        def pair(value: Any) -> tuple[int, int] | None:
            if isinstance(value, int):
                return value, value
            if isinstance(value, dict) and "height" in value and "width" in value:
                return int(value["height"]), int(value["width"])
            return None

        size = config.get("size", image_size) if config.get("do_resize", True) else None
        if isinstance(size, dict) and "shortest_edge" in size:
            resize: int | tuple[int, int] = int(size["shortest_edge"])
        elif isinstance(size, int):
            resize = size
        else:
            resize = pair(size) or image_size
        crop = pair(config.get("crop_size")) if config.get("do_center_crop", True) else None
        crop = crop or (resize if isinstance(resize, tuple) else (image_size, image_size))
        if not config.get("do_normalize", True):
            return cls(resize, crop, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        return cls(resize, crop, tuple(config.get("image_mean", CLIP_MEAN)), tuple(config.get("image_std", CLIP_STD)))


def _load_preprocess(processor_id: str, field: str, image_size: int) -> ClipPreprocess:
    """Reads the processor's image settings without building an image processor (which may want torchvision)."""
    local = Path(processor_id)
    if local.is_dir():
        config_file = local / "preprocessor_config.json"
        if not config_file.exists():  # a bare model folder: CLIP's own settings at the model's resolution
            return ClipPreprocess(image_size, (image_size, image_size))
        return ClipPreprocess.from_config(json.loads(config_file.read_text()), image_size)

    def load(mid: str) -> dict[str, Any]:
        from transformers.image_processing_base import ImageProcessingMixin

        return ImageProcessingMixin.get_image_processor_dict(mid)[0]

    return ClipPreprocess.from_config(load_or_explain(load, processor_id, field), image_size)


def _load_tokenizer(processor_id: str, field: str) -> Any:
    def load(mid: str) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(mid)

    return load_or_explain(load, processor_id, field)


def _load_clip(model_id: str, field: str, device: str, dtype: torch.dtype) -> CLIPModel:
    def load(mid: str) -> CLIPModel:
        from transformers import CLIPModel

        return CLIPModel.from_pretrained(mid, dtype=dtype)

    model = load_or_explain(load, model_id, field)
    return model.to(device).eval().requires_grad_(False)


def _embedding(output: Any) -> torch.Tensor:
    """transformers 5 returns BaseModelOutputWithPooling (the projection is `.pooler_output`); 4.x a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _normalized(embeds: torch.Tensor) -> torch.Tensor:
    embeds = embeds.float()
    return embeds / embeds.norm(dim=-1, keepdim=True)


class ClipEncoder:
    """One CLIP model with its preprocessing; yields L2-normalized float32 embeddings, batched.

    Image embeddings keep their graph to images that want gradients (`grad_path.wanted`); text embeddings never do.
    """

    def __init__(self, model: CLIPModel, preprocess: ClipPreprocess, tokenizer: Any = None, batch_size: int = 16):
        self.model, self.preprocess, self.tokenizer, self.batch_size = model, preprocess, tokenizer, batch_size
        self.dtype = model.dtype

    @property
    def device(self) -> torch.device:
        """Where the model is now: inputs follow it when `align.offload_rewards` moves it."""
        return self.model.device

    def images(self, images: torch.Tensor) -> torch.Tensor:
        grad = wanted(images)
        out = []
        with torch.set_grad_enabled(grad):
            for chunk in images.split(self.batch_size):
                pixels = self.preprocess((chunk if grad else chunk.detach()).to(self.device)).to(self.dtype)
                out.append(_normalized(_embedding(self.model.get_image_features(pixel_values=pixels))))
        return torch.cat(out)

    @torch.no_grad()
    def texts(self, prompts: list[str]) -> torch.Tensor:
        """One embedding per prompt; repeated prompts (the usual DDPO batch) are encoded once."""
        unique = list(dict.fromkeys(prompts))
        length = min(TEXT_LENGTH, self.model.config.text_config.max_position_embeddings)
        out = []
        for start in range(0, len(unique), self.batch_size):
            tokens = self.tokenizer(unique[start:start + self.batch_size], padding="max_length", max_length=length,
                                    truncation=True, return_tensors="pt").to(self.device)
            out.append(_normalized(_embedding(self.model.get_text_features(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]))))
        row = {prompt: i for i, prompt in enumerate(unique)}
        return torch.cat(out)[[row[prompt] for prompt in prompts]]


def load_clip_encoder(model_id: str, model_field: str, processor_id: str, processor_field: str, device: str,
                      torch_dtype: torch.dtype, batch_size: int, with_text: bool) -> ClipEncoder:
    """A CLIP model with its preprocessing (and tokenizer); load errors name `model_field`/`processor_field`."""
    model = _load_clip(model_id, model_field, device, torch_dtype)
    preprocess = _load_preprocess(processor_id, processor_field, model.config.vision_config.image_size)
    tokenizer = _load_tokenizer(processor_id, processor_field) if with_text else None
    return ClipEncoder(model, preprocess, tokenizer, batch_size)


def _clip_encoder(reward: str, model_id: str, model_option: str, processor_id: str, processor_option: str,
                  device: str, dtype: str, batch_size: int, with_text: bool) -> ClipEncoder:
    _check_batch_size(batch_size, reward)
    torch_dtype = common.torch_dtype(dtype, _field(reward, "dtype"))
    return load_clip_encoder(model_id, _field(reward, model_option), processor_id, _field(reward, processor_option),
                             device, torch_dtype, batch_size, with_text)


# ---------------------------------------------------------------- aesthetic


def _head_file(head: str, field: str) -> Path:
    """A local .pth/.safetensors path, or a hub spec `owner/repo/path/in/repo` fetched with hf_hub_download."""
    local = Path(head).expanduser()
    if local.is_file():
        return local
    parts = head.split("/")
    if local.exists() or head.startswith(("/", ".", "~")) or len(parts) < 3 or not all(parts):
        raise RewardError(f"{field}={head!r}: no such file; give a local .pth or .safetensors file, "
                          f"or a hub spec owner/repo/file such as {AESTHETIC_HEAD!r}")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id=repo_id, filename=filename))
    except Exception as err:  # network, auth, missing file: all mean "no weights"
        name = Path(filename).name
        raise RewardError(
            f"{field}={head!r}: could not download {filename!r} from the Hugging Face hub repo {repo_id!r} "
            f"({type(err).__name__}: {err}). Without network access, download it where you can "
            f"(`hf download {repo_id} {filename} --local-dir /path/to/copy`) and pass the file: "
            f"`--set {field}=/path/to/copy/{name}`."
        ) from err


def load_aesthetic_head(head: str, width: int, field: str = _field("aesthetic", "head")) -> common.ScoreMLP:
    """Loads the head strictly: a missing or unexpected key, or a width that does not fit the CLIP, is an error."""
    path = _head_file(head, field)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        elif path.suffix in (".pth", ".pt", ".bin"):
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise RewardError(f"{field}={head!r}: expected a .pth or .safetensors file, got {path.name!r}")
    except RewardError:
        raise
    except Exception as err:
        raise RewardError(f"{field}={head!r}: could not read {path} ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict):
        raise RewardError(f"{field}={head!r}: expected a state dict, got {type(state).__name__}")
    module = common.ScoreMLP(width)
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise RewardError(f"{field}={head!r} is not an aesthetic-predictor head: missing keys {missing}, "
                          f"unexpected keys {unexpected}")
    try:
        module.load_state_dict(state)
    except RuntimeError as err:  # shape mismatch: a head for another CLIP width
        raise RewardError(f"{field}={head!r} does not fit a CLIP with {width}-d image embeddings: {err}") from err
    return module.eval().requires_grad_(False)


@register("aesthetic", differentiable=True)
def aesthetic(clip_model: str = "openai/clip-vit-large-patch14", head: str = AESTHETIC_HEAD, device: str = "cpu",
              dtype: str = "float32", batch_size: int = 16) -> RewardFn:
    """LAION aesthetic predictor v2 (roughly 1-10): the MLP head on the L2-normalized CLIP image embedding.

    `head` is a local `.pth`/`.safetensors` file or a hub spec `owner/repo/file`; its input width must equal
    the CLIP's projection dim (768 for ViT-L/14). The head runs in float32 whatever `dtype` the CLIP uses.
    """
    encoder = _clip_encoder("aesthetic", clip_model, "clip_model", clip_model, "clip_model", device, dtype,
                            batch_size, with_text=False)
    mlp = load_aesthetic_head(head, encoder.model.config.projection_dim).to(encoder.device)

    def reward(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        if not validate_batch(images, prompts, metadata):
            return torch.zeros(0)
        with torch.set_grad_enabled(wanted(images)):
            return place(mlp(encoder.images(images)).squeeze(-1), images)

    reward.torch_modules = [encoder.model, mlp]
    return reward


# ---------------------------------------------------------------- alignment


@register("clip_t", differentiable=True)
def clip_t(clip_model: str = "openai/clip-vit-base-patch32", device: str = "cpu", dtype: str = "float32",
           batch_size: int = 16) -> RewardFn:
    """CLIP-T: cosine similarity in [-1, 1] between each image and its prompt, as given."""
    encoder = _clip_encoder("clip_t", clip_model, "clip_model", clip_model, "clip_model", device, dtype,
                            batch_size, with_text=True)

    def reward(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        if not validate_batch(images, prompts, metadata):
            return torch.zeros(0)
        return place((encoder.images(images) * encoder.texts(prompts)).sum(-1), images)

    reward.torch_modules = [encoder.model]
    return reward


@register("pickscore", differentiable=True)
def pickscore(model: str = "yuvalkirstain/PickScore_v1", processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
              device: str = "cpu", dtype: str = "float32", batch_size: int = 16) -> RewardFn:
    """PickScore: logit_scale.exp() * cosine(image, prompt), as in the PickScore README (about 20-23 for SD)."""
    encoder = _clip_encoder("pickscore", model, "model", processor, "processor", device, dtype, batch_size,
                            with_text=True)
    scale = encoder.model.logit_scale.detach().float().exp().cpu()

    def reward(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        if not validate_batch(images, prompts, metadata):
            return torch.zeros(0)
        return place(scale.to(encoder.device) * (encoder.images(images) * encoder.texts(prompts)).sum(-1), images)

    reward.torch_modules = [encoder.model]
    return reward
