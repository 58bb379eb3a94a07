"""Rewards for stage two, behind one signature and an explicit registry.

A reward module registers factories with `@register(name)`; a config names a reward and its
options, and `build_reward` builds it. Factories of model-based rewards import their heavy
dependencies (transformers, insightface) inside the factory body, so importing this package
stays cheap: the reward modules are imported here, but none of them imports a model library at
module level.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Protocol, TypeVar

import torch

from rlbooth.errors import RlboothError


class RewardError(RlboothError, ValueError):
    """A reward cannot be built or misbehaved; the message names the reward."""


class RewardFn(Protocol):
    """Scores a batch of decoded samples; higher is better.

    `images` is (B, 3, H, W), float in [0, 1], on any device; `prompts` and `metadata` hold one
    entry per image (metadata carries what a reward may need beyond the prompt, such as whether
    the prompt names the subject's identifier). Returns (B,) float32 on the CPU, without
    gradients: rewards are constants to the policy gradient.
    """

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor: ...


Factory = TypeVar("Factory", bound=Callable[..., RewardFn])

_REGISTRY: dict[str, Callable[..., RewardFn]] = {}


def register(name: str) -> Callable[[Factory], Factory]:
    """Names a factory `(**options) -> RewardFn` so configs can ask for it."""

    def decorator(factory: Factory) -> Factory:
        known = _REGISTRY.get(name)
        # A reloaded module registers a new object for the same function; anything else is a clash.
        if known is not None and _origin(known) != _origin(factory):
            raise RewardError(f"reward {name!r} is already registered by {_origin(known)}")
        _REGISTRY[name] = factory
        return factory

    return decorator


def _origin(factory: Callable[..., RewardFn]) -> str:
    return f"{factory.__module__}.{factory.__qualname__}"


def available_rewards() -> list[str]:
    return sorted(_REGISTRY)


def reward_parameters(name: str) -> list[str]:
    """The option names reward `name`'s factory takes (empty for an unknown name)."""
    factory = _REGISTRY.get(name)
    return list(inspect.signature(factory).parameters) if factory is not None else []


def build_reward(name: str, **options: object) -> RewardFn:
    """Builds a registered reward; a typo in its name or options is a user error, not a traceback."""
    factory = _REGISTRY.get(name)
    if factory is None:
        raise RewardError(f"unknown reward {name!r}; known rewards: {', '.join(available_rewards())}")
    signature = inspect.signature(factory)
    try:
        signature.bind(**options)
    except TypeError as err:
        accepted = ", ".join(signature.parameters) or "none"
        raise RewardError(f"bad options for reward {name!r}: {err}; it accepts: {accepted}") from None
    return factory(**options)


def validate_batch(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> int:
    """Checks the `RewardFn` input contract and returns the batch size.

    Images in [-1, 1] (a VAE's raw output) would otherwise be scored silently and wrongly.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise RewardError(f"reward images must be a (B, 3, H, W) tensor, got {shape}")
    if not images.is_floating_point():
        raise RewardError(f"reward images must be float in [0, 1], got {images.dtype}")
    batch = images.shape[0]
    if len(prompts) != batch or len(metadata) != batch:
        raise RewardError(f"reward got {batch} images, {len(prompts)} prompts and {len(metadata)} "
                          "metadata entries; give one of each per image")
    with torch.no_grad():
        if batch and not bool(((images >= 0) & (images <= 1)).all()):
            raise RewardError(f"reward images must lie in [0, 1], got values in [{images.min().item():.3g}, "
                              f"{images.max().item():.3g}]; decode with (x / 2 + 0.5).clamp(0, 1)")
    return batch


from rlbooth.rewards import clip_models, identity, image_reward, image_stats  # noqa: E402,F401  (register their rewards)
from rlbooth.toyworld import rewards as _toyworld_rewards  # noqa: E402,F401
from rlbooth.rewards.composite import CompositeReward  # noqa: E402

__all__ = [
    "CompositeReward",
    "RewardError",
    "RewardFn",
    "available_rewards",
    "build_reward",
    "register",
    "validate_batch",
]
