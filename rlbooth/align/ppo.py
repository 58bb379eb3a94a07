"""PPO's clipped objective and DDPO's reward normalization.

Written here rather than taken from TRL: TRL's last diffusion trainer
(0.23.1) samples from the base model instead of the personalized one.
"""

from __future__ import annotations

from collections import deque
from typing import Literal

import numpy as np
import torch
from torch import Tensor

_STD_EPS = 1e-6
_FLOW_GRPO_STD_EPS = 1e-4  # Flow-GRPO's stat tracker adds this to its std

GroupStd = Literal["residuals", "rewards"]


def ppo_clip_loss(
    log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate loss; the info dict is for logging only (detached).

    Taking the max of the two negated surrogates makes the update stop
    wherever moving the ratio further out of [1 - clip, 1 + clip] would only
    help the objective, which keeps each step close to the sampling policy.
    """
    if not clip_range > 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    if not log_prob.shape == old_log_prob.shape == advantages.shape:
        # Broadcasting (B,) against (B, 1) would silently build a B x B loss.
        raise ValueError(
            "log_prob, old_log_prob and advantages must have the same shape, got "
            f"{tuple(log_prob.shape)}, {tuple(old_log_prob.shape)}, {tuple(advantages.shape)}"
        )
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.mean(torch.maximum(unclipped, clipped))
    with torch.no_grad():
        info = {
            "approx_kl": 0.5 * torch.mean(log_ratio**2),
            "clipfrac": torch.mean((torch.abs(ratio - 1.0) > clip_range).float()),
            "ratio": torch.mean(ratio),
        }
    return loss, info


def batch_advantages(rewards: np.ndarray) -> np.ndarray:
    """Standardize over the whole batch, for runs without per-prompt tracking."""
    rewards = np.asarray(rewards, dtype=np.float64)
    return (rewards - rewards.mean()) / (rewards.std() + _STD_EPS)


def group_advantages(rewards: np.ndarray, groups: np.ndarray, std_of: GroupStd = "residuals") -> np.ndarray:
    """Each reward minus its group's mean, over the batch's std of those differences (`residuals`), or over
    the std of all the batch's rewards plus 1e-4 (`rewards`: Flow-GRPO's `global_std`).

    A group shares its prompt and initial noise x_T (unless align.group_noise is `independent`). The start
    is not an action of the policy, yet it decides much of the reward (the layout, the background); a
    baseline per start takes that variance out of the gradient without biasing it (the mean with the
    sample itself is the leave-one-out baseline scaled by (K - 1) / K, and the batch's std rescales it
    anyway).
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    groups = np.asarray(groups)
    if rewards.ndim != 1 or groups.shape != rewards.shape:
        raise ValueError(f"rewards and groups must be 1-D of equal length, got {rewards.shape} and {groups.shape}")
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    if (counts < 2).any():
        raise ValueError("every group needs at least 2 samples: a lone sample has no baseline but itself")
    residuals = rewards - (np.bincount(inverse, weights=rewards) / counts)[inverse]
    if std_of == "rewards":
        return residuals / (rewards.std() + _FLOW_GRPO_STD_EPS)
    if std_of != "residuals":
        raise ValueError(f"std_of must be 'residuals' or 'rewards', got {std_of!r}")
    return residuals / (residuals.std() + _STD_EPS)


def per_reward_advantages(components: dict[str, np.ndarray], weights: dict[str, float], groups: np.ndarray
                          ) -> np.ndarray:
    """Each component standardized within its group, then weighted, summed and standardized over the batch.

    GDPO's decoupled normalization: the advantage of a weighted sum lets the reward with the largest spread
    decide the ranking; standardized first, each reward moves the advantage by its weight alone. A component
    absent for a sample (NaN: identity without the identifier) adds nothing to it, and a group with fewer
    than two present values has no spread to measure and adds nothing either.
    """
    groups = np.asarray(groups)
    total = np.zeros(len(groups), dtype=np.float64)
    for name, values in components.items():
        values = np.asarray(values, dtype=np.float64)
        if values.shape != groups.shape:
            raise ValueError(f"component {name!r} has shape {values.shape}, groups {groups.shape}")
        normalized = np.zeros_like(values)
        for group in np.unique(groups):
            mask = (groups == group) & ~np.isnan(values)
            if mask.sum() > 1:
                normalized[mask] = (values[mask] - values[mask].mean()) / (values[mask].std() + _STD_EPS)
        total += weights[name] * normalized
    return (total - total.mean()) / (total.std() + _STD_EPS)


def clip_advantages(advantages: np.ndarray, max_abs: float) -> np.ndarray:
    """Bound outliers, which would otherwise dominate a batch's gradient."""
    if not max_abs > 0:
        raise ValueError(f"max_abs must be > 0, got {max_abs}")
    return np.clip(advantages, -max_abs, max_abs)


class PerPromptStatTracker:
    """Normalizes rewards per prompt, so easy prompts do not drown out hard ones.

    Until a prompt's buffer holds ``min_count`` rewards its estimate is too
    noisy, and the whole batch's statistics are used instead.
    """

    def __init__(self, buffer_size: int, min_count: int) -> None:
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        if min_count > buffer_size:
            # The buffer could never reach min_count: batch statistics forever.
            raise ValueError(f"min_count ({min_count}) must be <= buffer_size ({buffer_size})")
        self.buffer_size = buffer_size
        self.min_count = min_count
        self._buffers: dict[str, deque[float]] = {}

    def update(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        """Record this batch's rewards and return their advantages (float64)."""
        rewards = np.asarray(rewards, dtype=np.float64)
        if rewards.ndim != 1 or len(prompts) != len(rewards):
            raise ValueError(
                f"rewards must be 1-D with one value per prompt, got shape {rewards.shape} for {len(prompts)} prompts"
            )
        prompt_array = np.asarray(prompts, dtype=object)
        advantages = np.empty_like(rewards)
        for prompt in dict.fromkeys(prompts):
            mask = prompt_array == prompt
            buffer = self._buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(rewards[mask].tolist())
            reference = np.asarray(buffer) if len(buffer) >= self.min_count else rewards
            advantages[mask] = (rewards[mask] - reference.mean()) / (reference.std() + _STD_EPS)
        return advantages

    def stats(self) -> dict[str, float]:
        lengths = [len(b) for b in self._buffers.values()]
        return {
            "num_prompts": len(lengths),
            "mean_buffer_length": float(np.mean(lengths)) if lengths else 0.0,
        }

    def state_dict(self) -> dict[str, dict[str, list[float]]]:
        """Plain lists of floats, so a checkpoint can store it as JSON."""
        return {"buffers": {prompt: list(buffer) for prompt, buffer in self._buffers.items()}}

    def load_state_dict(self, state: dict[str, dict[str, list[float]]]) -> None:
        """Replace the buffers; a longer saved buffer keeps its newest values."""
        self._buffers = {
            prompt: deque((float(r) for r in values), maxlen=self.buffer_size)
            for prompt, values in state["buffers"].items()
        }
