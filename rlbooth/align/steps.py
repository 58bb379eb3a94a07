"""Which stored steps of each trajectory stage two trains on.

DDPO draws a random subset of the window's steps per sample (`random`); Flow-GRPO trains the first
floor(N x timestep_fraction) steps of every trajectory in order (`first`), so at its 0.99 x 10 steps the
last, near-deterministic step (std about 0.006 on SD3) is never trained.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from rlbooth.config import AlignConfig


def trained_steps(cfg: "AlignConfig", sample_indices: Tensor, seed_of: Callable[[int], int]) -> Tensor:
    """(N, align.num_train_timesteps) step indices for the samples `sample_indices`, in training order;
    `random` keys each sample's draw by `seed_of(its global index)`, so a resumed run draws the same."""
    pool, k = torch.tensor(cfg.train_steps), cfg.num_train_timesteps
    if cfg.train_step_selection == "first":
        return pool[:k].expand(len(sample_indices), k).clone()
    return torch.stack([pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed_of(int(i))))[:k]]
                        for i in sample_indices])
