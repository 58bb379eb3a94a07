"""DreamBench's metrics: pure functions on embeddings, and the encoders that produce them.

- DINO: mean pairwise cosine of DINO ViT-S/16 CLS embeddings, generated x real images;
- CLIP-I: the same with CLIP image embeddings;
- CLIP-T: cosine of the image and prompt CLIP embeddings, the prompt's identifier removed;
- ImageReward, PickScore: rlbooth's reward modules (`build_reward`), on the identifier-free prompt.

Per image, DINO and CLIP-I are the mean cosine to every real photo, so the mean over a subject's
images is `pairwise_mean_cosine` over all generated x real pairs. Models load lazily, only when
something is left to score; heavy imports stay inside functions.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

METRICS = ("dino", "clip_i", "clip_t", "image_reward", "pickscore")
TITLES = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "image_reward": "ImageReward",
          "pickscore": "PickScore"}
DEFAULT_DINO = "facebook/dino-vits16"
DEFAULT_CLIP = "openai/clip-vit-base-patch32"


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(A, D) x (B, D) -> (A, B) cosines, in float32."""
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    return a @ b.T


def pairwise_mean_cosine(generated: torch.Tensor, real: torch.Tensor) -> float:
    """The mean cosine over all G x R pairs of generated (G, D) and real (R, D) embeddings."""
    if generated.ndim != 2 or real.ndim != 2 or generated.shape[1] != real.shape[1]:
        raise ValueError(f"expected (G, D) and (R, D) embeddings, got {tuple(generated.shape)} and "
                         f"{tuple(real.shape)}")
    if not len(generated) or not len(real):
        raise ValueError("pairwise_mean_cosine needs at least one generated and one real embedding")
    return float(cosine_matrix(generated, real).mean())


def strip_identifier(prompt: str, identifier: str) -> str:
    """The prompt without the identifier word, spaces collapsed: `a sks dog` -> `a dog`."""
    if identifier.strip():
        prompt = re.sub(rf"(?<!\w){re.escape(identifier.strip())}(?!\w)", " ", prompt)
    return re.sub(r"\s+", " ", prompt).strip()


def pil_to_tensor(img: Any, square: bool = False) -> torch.Tensor:
    """A PIL image as (1, 3, H, W) in [0, 1]; `square` keeps its central square (real photos)."""
    from rlbooth.images import to_rgb

    img = to_rgb(img)
    if square:
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side))
    array = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def load_images(paths: Sequence[Path], square: bool = False) -> list[torch.Tensor]:
    from PIL import Image

    out = []
    for path in paths:
        with Image.open(path) as img:
            out.append(pil_to_tensor(img, square))
    return out


def embed_all(embed: Callable[[torch.Tensor], torch.Tensor], images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Embeds (1, 3, H, W) tensors of possibly different sizes, batching those of equal size; order kept."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(i)
    rows: list[torch.Tensor | None] = [None] * len(images)
    for indices in groups.values():
        embeds = embed(torch.cat([images[i] for i in indices])).float().cpu()
        for i, row in zip(indices, embeds):
            rows[i] = row
    return torch.stack([r for r in rows if r is not None])


class DinoEncoder:
    """CLS embeddings of a ViT (DINO ViT-S/16 by default), preprocessed as rlbooth's identity_dino reward."""

    def __init__(self, model_id: str = DEFAULT_DINO, device: str = "cpu") -> None:
        from transformers import ViTModel

        from rlbooth.rewards.hub import load_or_explain

        vit = load_or_explain(lambda name: ViTModel.from_pretrained(name, add_pooling_layer=False), model_id,
                              field="--dino-model")
        self.model = vit.to(device).eval().requires_grad_(False)
        self.device = device
        self.size = int(vit.config.image_size)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        from rlbooth.rewards.identity import dino_preprocess

        pixels = dino_preprocess(images.to(self.device), self.size)
        return self.model(pixel_values=pixels).last_hidden_state[:, 0].float().cpu()


def clip_encoder(model_id: str = DEFAULT_CLIP, device: str = "cpu", batch_size: int = 16) -> Any:
    """rlbooth's ClipEncoder (the CLIP-T / PickScore reward path) with image and text towers."""
    from rlbooth.rewards.clip_models import load_clip_encoder

    return load_clip_encoder(model_id, "--clip-model", model_id, "--clip-model", device, torch.float32, batch_size,
                             with_text=True)


@dataclass(frozen=True)
class MetricOptions:
    dino_model: str = DEFAULT_DINO
    clip_model: str = DEFAULT_CLIP
    image_reward_checkpoint: str = "THUDM/ImageReward"
    image_reward_tokenizer: str = "bert-base-uncased"
    pickscore_model: str = "yuvalkirstain/PickScore_v1"
    pickscore_processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    device: str = "cpu"

    def reward_options(self, metric: str) -> dict[str, Any]:
        if metric == "image_reward":
            return {"checkpoint": self.image_reward_checkpoint, "tokenizer": self.image_reward_tokenizer,
                    "device": self.device}
        if metric == "pickscore":
            return {"model": self.pickscore_model, "processor": self.pickscore_processor, "device": self.device}
        raise KeyError(metric)


def build_reward_metric(metric: str, options: MetricOptions) -> Callable[..., torch.Tensor]:
    """ImageReward or PickScore through rlbooth's reward registry."""
    from rlbooth.rewards import build_reward

    return build_reward(metric, **options.reward_options(metric))


class MetricSuite:
    """The requested metrics; each model is loaded on first use."""

    def __init__(self, metrics: Sequence[str], options: MetricOptions) -> None:
        self.metrics, self.options = tuple(metrics), options
        self._dino: DinoEncoder | None = None
        self._clip: Any = None
        self._rewards: dict[str, Callable[..., torch.Tensor]] = {}

    @property
    def dino(self) -> DinoEncoder:
        if self._dino is None:
            self._dino = DinoEncoder(self.options.dino_model, self.options.device)
        return self._dino

    @property
    def clip(self) -> Any:
        if self._clip is None:
            self._clip = clip_encoder(self.options.clip_model, self.options.device)
        return self._clip

    def reward(self, metric: str) -> Callable[..., torch.Tensor]:
        if metric not in self._rewards:
            self._rewards[metric] = build_reward_metric(metric, self.options)
        return self._rewards[metric]

    def reference(self, photos: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Embeddings of a subject's real photos (central squares) for DINO and CLIP-I."""
        ref = {}
        if "dino" in self.metrics:
            ref["dino"] = embed_all(self.dino, photos)
        if "clip_i" in self.metrics:
            ref["clip_i"] = embed_all(self.clip.images, photos)
        return ref

    def score(self, images: torch.Tensor, prompts: list[str], reference: dict[str, torch.Tensor]
              ) -> dict[str, list[float]]:
        """Per-image scores of (B, 3, H, W) images in [0, 1]; `prompts` already without the identifier."""
        out: dict[str, list[float]] = {}
        if "dino" in self.metrics:
            out["dino"] = cosine_matrix(self.dino(images), reference["dino"]).mean(1).tolist()
        if "clip_i" in self.metrics or "clip_t" in self.metrics:
            embeds = self.clip.images(images).cpu()
            if "clip_i" in self.metrics:
                out["clip_i"] = cosine_matrix(embeds, reference["clip_i"]).mean(1).tolist()
            if "clip_t" in self.metrics:
                out["clip_t"] = cosine_matrix(embeds, self.clip.texts(prompts).cpu()).diagonal().tolist()
        for metric in ("image_reward", "pickscore"):
            if metric in self.metrics:
                scores = self.reward(metric)(images, prompts, [{} for _ in prompts])
                out[metric] = [float(s) for s in scores]
        return out
