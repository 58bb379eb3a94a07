"""Rewards that read a toy-world image back, registered like the model-based ones.

The renderer puts the background alone in the top and bottom strips and the object alone in the
centre crop, so code can score what a learned model would otherwise have to judge:

- `toy_alignment`: does the background show the scene the prompt names (the world's CLIP-T);
- `toy_identity`: does the centre hold the subject's colours in the photos' proportions (its DINO);
- `toy_aesthetic`: is the background clean (flat, as every rendered background is).

All are torch ops on the images' device, so the first three backpropagate (reward feedback learning);
`toy_scene_accuracy`, an argmin, has no gradient and is for evaluation.
"""

from __future__ import annotations

import torch

from rlbooth.rewards import RewardError, as_float, register, reward_output, validate_batch
from rlbooth.rewards.identity import subject_photo_squares
from rlbooth.subject import Subject
from rlbooth.toyworld import world

ALIGNMENT_TEMPERATURE = 0.5
"""Scale of the squared colour distance (6 channels in [0, 1]) in the alignment reward's exp(-d^2 / T)."""
PALETTE_TEMPERATURE = 0.02
"""Softness of a pixel's assignment to the world's palette colours in the identity histogram."""
NOISE_SCALE = 0.05
"""Background standard deviation at which the aesthetic score falls to 1/e."""


def _at_world_size(images: torch.Tensor) -> torch.Tensor:
    images = as_float(images)
    if images.shape[-2:] != (world.SIZE, world.SIZE):
        images = torch.nn.functional.interpolate(images, size=(world.SIZE, world.SIZE), mode="area")
    return images


def _strips(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return images[:, :, :world.STRIP], images[:, :, -world.STRIP:]


def background_colours(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 6): mean sky colour then mean ground colour, in [0, 1]."""
    sky, ground = _strips(_at_world_size(images))
    return torch.cat([sky.mean(dim=(2, 3)), ground.mean(dim=(2, 3))], dim=1)


def scene_distances(images: torch.Tensor) -> torch.Tensor:
    """(B, S): squared distance of each image's background to each scene of `world.SCENES`, in order."""
    palette = torch.tensor([sky + ground for sky, ground in world.SCENES.values()], dtype=torch.float32) / 255
    colours = background_colours(images)
    return (colours[:, None, :] - palette.to(colours)[None]).pow(2).sum(-1)


def asked_scenes(prompts: list[str], reward: str) -> list[int]:
    """Index in `world.SCENES` of the scene each prompt names; a prompt without one is an error."""
    names = list(world.SCENES)
    indices = []
    for prompt in prompts:
        scene = world.parse_scene(prompt)
        if scene is None:
            raise RewardError(f"reward {reward!r}: prompt {prompt!r} names no scene of the toy world; "
                              f"end it with one of: {', '.join(names)}")
        indices.append(names.index(scene))
    return indices


def scene_accuracy(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """(B,) 1.0 where the nearest scene to the background is the one the prompt asks for."""
    nearest = scene_distances(images.detach()).argmin(dim=1).cpu()
    return (nearest == torch.tensor(asked_scenes(prompts, "scene_accuracy"))).float()


def palette() -> torch.Tensor:
    colours = [*world.COLOURS.values(), *world.SUBJECT_COLOURS]
    colours += [c for pair in world.SCENES.values() for c in pair]
    return torch.tensor(colours, dtype=torch.float32) / 255


def centre_histogram(images: torch.Tensor) -> torch.Tensor:
    """(B, P): soft share of the centre crop's pixels near each palette colour (rows sum to 1)."""
    centre = _at_world_size(images)[:, :, world.CENTRE, world.CENTRE].flatten(2).transpose(1, 2)  # (B, N, 3)
    distances = (centre[:, :, None, :] - palette().to(centre)[None, None]).pow(2).sum(-1)
    return torch.softmax(-distances / PALETTE_TEMPERATURE, dim=-1).mean(dim=1)


class ToyAlignment:
    """exp(-d^2 / T) of the background to the asked scene's colours: 1 when exact, smooth for RL."""

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        if validate_batch(images, prompts, metadata) == 0:
            return torch.zeros(0)
        distances = scene_distances(images)
        asked = torch.tensor(asked_scenes(prompts, "toy_alignment"), device=distances.device)
        return reward_output(torch.exp(-distances[torch.arange(len(prompts), device=distances.device), asked]
                                       / ALIGNMENT_TEMPERATURE), images)


class ToyIdentity:
    """Histogram intersection of the centre's palette shares with the subject photos' mean, in [0, 1]."""

    identifier_only = True

    def __init__(self, photos: list[torch.Tensor]) -> None:
        with torch.no_grad():
            self.reference = centre_histogram(torch.cat(photos)).mean(dim=0)

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        if validate_batch(images, prompts, metadata) == 0:
            return torch.zeros(0)
        histogram = centre_histogram(images)
        return reward_output(torch.minimum(histogram, self.reference.to(histogram)).sum(dim=1), images)


def _aesthetic(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
    if validate_batch(images, prompts, metadata) == 0:
        return torch.zeros(0)
    sky, ground = _strips(_at_world_size(images))
    noise = (sky.std(dim=(2, 3)).mean(1) + ground.std(dim=(2, 3)).mean(1)) / 2
    return reward_output(torch.exp(-noise / NOISE_SCALE), images)


@register("toy_alignment", differentiable=True)
def toy_alignment() -> ToyAlignment:
    """Does the background show the scene the prompt names (every prompt must name one)."""
    return ToyAlignment()


@register("toy_identity", differentiable=True)
def toy_identity(subject: Subject | None = None) -> ToyIdentity:
    """Does the centre hold the subject's colours as its photos do; prompts with the identifier only."""
    return ToyIdentity(subject_photo_squares(subject, "toy_identity"))


@register("toy_aesthetic", differentiable=True)
def toy_aesthetic() -> object:
    """A clean, flat background scores 1; noise and smudges lower it."""
    return _aesthetic


def _scene_accuracy(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
    if validate_batch(images, prompts, metadata) == 0:
        return torch.zeros(0)
    return scene_accuracy(images, prompts)


@register("toy_scene_accuracy")
def toy_scene_accuracy() -> object:
    """1 where the background's nearest scene is the asked one: a truth to watch (align.eval_rewards)."""
    return _scene_accuracy
